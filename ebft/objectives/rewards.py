"""Feature-matching rewards (paper §2, eqs. 7-9 and 67) with the whitening variants, and the
conditional feature-matching loss they estimate (eq. 2; whitened: eq. 53).

For one context: generated features ``phi_1..phi_n`` (rows of ``X``, shape ``n x D``)
and the ground-truth feature ``psi``. After an optional whitening ``(phi~, psi~_j)``:

    AT_j = 2 cos(phi~_j, psi~_j)                               normalised alignment (eq. 9)
    DT_j = 2/(n-1) * sum_{j' != j} phi~_j . phi~_j'            raw dot products (eqs. 7, 9)
    r_j  = AT_j - alpha * DT_j                                 alignment bias alpha (eq. 67)

``n = 1`` has no pair, so ``DT = 0``. Cosines of zero vectors are 0.

Whitening (``whitening=``), always per group of ``n`` samples, in fp32:

* ``"none"``: ``phi~ = phi``, ``psi~_j = psi``. With L2-normalised features the cosine is
  the dot product of eq. 67.
* ``"reference"`` (the authors' released code, default): thin SVD ``X = U S V^T``, drop
  ``S <= 1e-5 * max S``, ``W = U S^-1 U^T`` (``n x n``), ``X~ = W X = U V^T`` and
  ``psi~_j = (sum_i W_ji) psi``: the ground truth is only rescaled, so
  ``AT_j = +-2 cos(phi~_j, psi)``. There is no ``1/n`` in the second moment: linearly
  independent rollouts become orthonormal (``X~ X~^T = I``, so ``DT = 0``) and, when the
  distinct ones are independent, a sample with multiplicity ``m`` gets
  ``DT_j = 2 (m-1) / ((n-1) m)``, ``n`` times less than eq. 48.
* ``"paper"`` (eq. 8): ``Sigma = (1/n) X^T X``, ``phi~ = (Sigma^+)^(1/2) phi`` applied to the
  samples and to ``psi``. With the SVD, ``(Sigma^+)^(1/2) = sqrt(n) V S^-1 V^T``, hence
  ``X~ = sqrt(n) U V^T`` and ``psi~ = sqrt(n) V S^-1 V^T psi`` (the ground truth is projected
  onto the span of the samples); duplicates give exactly eq. 48,
  ``DT_j = 2 n (m-1) / ((n-1) m)``. No ``D x D`` matrix is ever formed.

All groups (every leading dimension) go through one batched SVD. If it fails, each group is
retried alone, then with ``1e-6`` Gaussian noise added, and is left unwhitened as a last
resort (as the authors do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ebft.config import WHITENING, check_alpha

RANK_RTOL = 1e-5
SVD_RETRY_NOISE = 1e-6


@dataclass(frozen=True)
class FMRewards:
    """Per-sample reward parts, each of shape ``(..., n)``, fp32.

    ``reward = alignment - alpha * diversity`` (eq. 67).
    """

    alignment: Tensor
    diversity: Tensor
    reward: Tensor

    def kept(self, keep: Tensor) -> FMRewards:
        """These rewards with every part zeroed in the groups ``keep`` (``(...)`` bool) leaves out."""
        keep = keep.unsqueeze(-1)
        return FMRewards(*(torch.where(keep, part, torch.zeros_like(part))
                           for part in (self.alignment, self.diversity, self.reward)))


def _check_inputs(gen: Tensor, gt: Tensor, whitening: str) -> None:
    if whitening not in WHITENING:
        raise ValueError(f"whitening={whitening!r} is not supported; use one of {WHITENING}")
    if gen.ndim < 2:
        raise ValueError(f"generated features must have shape (..., n, D); got {tuple(gen.shape)}")
    expected = gen.shape[:-2] + gen.shape[-1:]
    if gt.shape != expected:
        raise ValueError(
            f"ground-truth features must have shape (..., D) = {tuple(expected)} to match generated "
            f"features {tuple(gen.shape)}; got {tuple(gt.shape)}")
    if not (torch.isfinite(gen).all() and torch.isfinite(gt).all()):
        raise ValueError("features contain NaN or inf; check the feature network's dtype and inputs "
                         "(bf16 overflow, padding rows) before computing rewards")


def _group_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Thin SVD of each ``n x D`` group of ``x`` (..., n, D) with the authors' fallbacks.

    Returns ``U (..., n, r), S (..., r), Vh (..., r, D)`` and ``ok (...)``; where ``ok`` is
    False the SVD failed even with noise and the group must stay unwhitened (its factors
    are zeros).
    """
    try:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u, s, vh, torch.ones(x.shape[:-2], dtype=torch.bool, device=x.device)
    except RuntimeError:
        pass
    flat = x.reshape(-1, *x.shape[-2:])
    r = min(x.shape[-2:])
    u = x.new_zeros(flat.shape[0], x.shape[-2], r)
    s = x.new_zeros(flat.shape[0], r)
    vh = x.new_zeros(flat.shape[0], r, x.shape[-1])
    ok = torch.zeros(flat.shape[0], dtype=torch.bool, device=x.device)
    for i, group in enumerate(flat):
        for attempt in (group, group + SVD_RETRY_NOISE * torch.randn_like(group)):
            try:
                u[i], s[i], vh[i] = torch.linalg.svd(attempt, full_matrices=False)
            except RuntimeError:
                continue
            ok[i] = True
            break
    lead = x.shape[:-2]
    return u.reshape(*lead, *u.shape[1:]), s.reshape(*lead, r), vh.reshape(*lead, *vh.shape[1:]), ok.reshape(lead)


def whiten_features(gen: Tensor, gt: Tensor, whitening: str = "reference") -> tuple[Tensor, Tensor]:
    """Whitened features ``(phi~ (..., n, D), psi~ (..., n, D))`` in fp32 (see module doc).

    ``psi~`` has one row per sample because the ``reference`` variant rescales the ground
    truth differently for each sample; for ``none`` and ``paper`` the rows are identical
    (an expanded view).
    """
    _check_inputs(gen, gt, whitening)
    gen, gt = gen.float(), gt.float()
    n = gen.shape[-2]
    if whitening == "none":
        return gen, gt.unsqueeze(-2).expand_as(gen)
    u, s, vh, ok = _group_svd(gen)
    keep = s > RANK_RTOL * s.amax(-1, keepdim=True)
    inv_s = torch.where(keep, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    u_kept = u * keep.unsqueeze(-2)
    if whitening == "reference":
        white_gen = u_kept @ vh  # = W X
        row_sums = (u * inv_s.unsqueeze(-2)) @ u.transpose(-1, -2).sum(-1, keepdim=True)  # W 1
        white_gt = row_sums * gt.unsqueeze(-2)
    else:
        white_gen = math.sqrt(n) * (u_kept @ vh)
        coords = inv_s * (vh @ gt.unsqueeze(-1)).squeeze(-1)  # S^-1 V^T psi
        white_gt = (math.sqrt(n) * (coords.unsqueeze(-2) @ vh)).expand_as(gen)
    ok = ok[..., None, None]
    return (torch.where(ok, white_gen, gen),
            torch.where(ok, white_gt, gt.unsqueeze(-2).expand_as(gen)))


def alignment_diversity(white_gen: Tensor, white_gt: Tensor) -> tuple[Tensor, Tensor]:
    """``AT_j = 2 cos(phi~_j, psi~_j)`` and ``DT_j = 2/(n-1) sum_{j'!=j} phi~_j . phi~_j'``.

    Inputs ``(..., n, D)``; outputs ``(..., n)``. ``DT = 0`` when ``n = 1``; the cosine of a
    zero vector is 0.
    """
    n = white_gen.shape[-2]
    alignment = 2.0 * (F.normalize(white_gen, dim=-1) * F.normalize(white_gt, dim=-1)).sum(-1)
    if n == 1:
        return alignment, torch.zeros_like(alignment)
    gram = white_gen @ white_gen.transpose(-1, -2)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    diversity = 2.0 / (n - 1) * (gram * off_diagonal).sum(-1)
    return alignment, diversity


@torch.no_grad()
def feature_matching_rewards(gen: Tensor, gt: Tensor, alpha: float,
                             whitening: str = "reference") -> FMRewards:
    """Rewards ``r_j = AT_j - alpha * DT_j`` (eqs. 7, 9, 67) for every group of samples.

    Args:
        gen: generated features ``(..., n, D)``, any float dtype (computed in fp32).
        gt: ground-truth features ``(..., D)``.
        alpha: diversity weight (alignment bias, paper §C), in [0, 1]; 1 is the proper
            scoring rule, smaller values favour alignment.
        whitening: ``"none"``, ``"reference"`` (authors' code) or ``"paper"`` (eq. 8).

    The rewards are constants for the policy gradient, so no autograd graph is built.
    """
    alpha = check_alpha(alpha)
    alignment, diversity = alignment_diversity(*whiten_features(gen, gt, whitening))
    return FMRewards(alignment=alignment, diversity=diversity, reward=alignment - alpha * diversity)


def cfm_estimate(gen: Tensor, gt: Tensor) -> Tensor:
    """Unbiased estimate of the conditional feature-matching loss of one context (paper eq. 2,
    ``L_CFM = ||E_{y_hat ~ p_theta(.|c)} phi_c(y_hat) - phi_c(y)||^2``) from ``n >= 2`` samples::

        ||psi||^2 - (2/n) sum_j phi_j . psi + 1/(n(n-1)) sum_{j != j'} phi_j . phi_j'

    (``phi_j`` the sample features, ``psi`` the ground truth's). With unit-norm features this is
    ``1 - mean_j AT_j + mean_j DT_j / 2`` in terms of the unwhitened rewards of eq. 7
    (``AT_j = 2 cos(phi_j, psi)``): the quantity the authors report (Figures 1-2).

    ``gen``: (..., n, D) sample features, ``gt``: (..., D) ground-truth features. Returns (...),
    computed in fp32.
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


def whitened_fm_proxy(gen: Tensor, gt: Tensor, whitening: str = "reference") -> Tensor:
    """The "feature-matching loss with whitening" (paper eq. 53 as a loss): :func:`cfm_estimate`'s
    ``1 - mean_j AT_j + mean_j DT_j / 2`` with the whitened ``AT``/``DT`` of eq. 9
    (``whitening`` as in :func:`feature_matching_rewards`). ``gen`` (..., n, D), ``gt`` (..., D);
    returns (...)."""
    r = feature_matching_rewards(gen, gt, alpha=1.0, whitening=whitening)
    return 1 - r.alignment.mean(-1) + r.diversity.mean(-1) / 2
