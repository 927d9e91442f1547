"""Calibration metrics: the conditional feature-matching loss (CFM) and its whitened proxy.

For a context ``c`` with ground-truth completion ``y`` and ``n`` model samples
``y_hat_1..n``, the feature-matching loss is ``|| E phi(c:y_hat) - phi(c:y) ||^2``.
Its unbiased estimate from ``n >= 2`` samples (:func:`cfm_estimate`) is

    ||psi||^2 - (2/n) sum_j phi_j . psi + 1/(n(n-1)) sum_{j != j'} phi_j . phi_j'.

With unit-norm features this is ``1 - mean_j AT_j + mean_j DT_j / 2`` in terms of
the rewards of paper eq. 7 (``AT_j = 2 cos(phi_j, psi)``, ``DT_j`` the diversity
term): the quantity the authors report. Computing the same expression with the
whitened ``AT``/``DT`` gives the "feature-matching loss with whitening", the proxy
of paper eq. 53 (:func:`whitened_fm_proxy`).
"""

from __future__ import annotations

import torch

from ebft.objectives.rewards import feature_matching_rewards


def cfm_estimate(gen: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of ``||E phi(c:y_hat) - phi(c:y)||^2`` per context.

    ``gen``: (..., n, D) sample features, ``gt``: (..., D) ground-truth features,
    n >= 2. Returns (...). Computed in fp32.
    """
    n = gen.shape[-2]
    if n < 2:
        raise ValueError(f"cfm_estimate needs n >= 2 samples per context, got n={n}")
    gen, gt = gen.float(), gt.float()
    gt_sq = (gt * gt).sum(-1)
    cross = (gen @ gt.unsqueeze(-1)).squeeze(-1).mean(-1)
    total = gen.sum(-2)
    pair_sum = (total * total).sum(-1) - (gen * gen).sum((-1, -2))
    return gt_sq - 2 * cross + pair_sum / (n * (n - 1))


def whitened_fm_proxy(gen: torch.Tensor, gt: torch.Tensor, whitening: str = "reference") -> torch.Tensor:
    """Paper eq. 53 as a loss: ``1 - mean_j AT_j + mean_j DT_j / 2`` with whitened rewards."""
    r = feature_matching_rewards(gen, gt, alpha=1.0, whitening=whitening)
    return 1 - r.alignment.mean(-1) + r.diversity.mean(-1) / 2
