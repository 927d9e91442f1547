"""Baselines and advantages: the corrected RLOO of paper eq. 94 (EBFT) and group
normalisation (GRPO, for RLVR).

RLOO for feature matching (paper §E). With ``T1_j = AT_j`` and ``T2_j = DT_j`` (eq. 90), the
naive leave-one-out mean of the rewards is not independent of sample ``j``: every other
``DT_j'`` contains ``phi_j . phi_j'``. Eq. 93 replaces ``DT_j'`` by its leave-two-out version
``DT_(j',j) = 2/(n-2) sum_{j'' not in {j', j}} phi_j'' . phi_j'``, and eq. 94 sums up to

    b_j = 1/(n-1) sum_{j'!=j} AT_j'  -  alpha/(n-2) * (sum_{j'!=j} DT_j'  -  DT_j).

This is eq. 94 term by term (its ``-1/(n-2) sum T2 + 1/(n-2) T2_j``), with the diversity
part multiplied by eq. 67's alignment bias ``alpha`` (eq. 94 is derived for alpha = 1; the
derivation is linear in the diversity term). ``sum_{j'!=j} DT_j' - DT_j`` equals
``2/(n-1)`` times the sum of ``phi_a . phi_b`` over ordered pairs ``a != b`` that avoid ``j``,
so ``b_j`` does not depend on ``phi_j`` (without whitening; whitening mixes all ``n``
samples into every feature, as in the authors' code). For ``n = 2`` no pair avoids ``j``:
the diversity part of the baseline is 0. For ``n = 1`` there is no other sample: ``b = 0``
(plain REINFORCE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ebft.config import BASELINES, SCALE_REWARDS, check_alpha
from ebft.objectives.rewards import FMRewards



def rloo_baseline(alignment: Tensor, diversity: Tensor, alpha: float) -> Tensor:
    """Leave-one-out baseline ``b_j`` of eq. 94 (diversity part scaled by ``alpha``), ``(..., n)``."""
    alpha = check_alpha(alpha)
    if alignment.shape != diversity.shape or alignment.ndim < 1:
        raise ValueError(f"alignment {tuple(alignment.shape)} and diversity {tuple(diversity.shape)} "
                         "must have the same shape (..., n)")
    n = alignment.shape[-1]
    if n == 1:
        return torch.zeros_like(alignment)
    baseline = (alignment.sum(-1, keepdim=True) - alignment) / (n - 1)
    if n > 2:
        others = diversity.sum(-1, keepdim=True) - diversity  # sum_{j' != j} DT_j'
        baseline = baseline - alpha * (others - diversity) / (n - 2)
    return baseline


def rloo_advantages(rewards: FMRewards, alpha: float) -> Tensor:
    """Advantages ``A_j = r_j - b_j`` (eqs. 92, 94), ``(..., n)``, no normalisation.

    The reward is recomposed as ``AT - alpha * DT`` with the ``alpha`` given here, so reward
    and baseline can never use different weights; it equals ``rewards.reward - b`` when
    ``alpha`` is the one the rewards were computed with. For ``n > 2`` the advantages of a
    group sum to zero for every ``alpha``; for ``n = 2`` only the alignment part does.
    """
    alpha = check_alpha(alpha)
    reward = rewards.alignment - alpha * rewards.diversity
    return reward - rloo_baseline(rewards.alignment, rewards.diversity, alpha)


def fm_advantages(rewards: FMRewards, alpha: float, baseline: str = "rloo_corrected") -> Tensor:
    """EBFT advantages ``(..., n)`` of the rewards ``r_j = AT_j - alpha * DT_j`` under one of ``BASELINES``:

    - ``rloo_corrected`` (default): ``r_j - b_j`` with ``b_j`` of eq. 94 (:func:`rloo_advantages`): no
      ``b_j`` depends on sample ``j``, so the policy gradient stays unbiased (needs n >= 2);
    - ``rloo``: plain leave-one-out, ``r_j - 1/(n-1) sum_{j'!=j} r_j'`` (axolotl's strided mode). With
      ``alpha > 0`` it is biased: every ``DT_j'`` holds ``phi_j . phi_j'``, so the baseline depends on
      sample ``j`` (needs n >= 2);
    - ``group_norm``: ``(r_j - mean_j r) / (std_j r + 1e-4)`` (GRPO's, an option of the authors' code;
      :func:`group_normalized_advantages`; needs n >= 2);
    - ``reinforce``: ``r_j``, no baseline (plain REINFORCE; any n).
    """
    alpha = check_alpha(alpha)
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r} is not one of {BASELINES}")
    n = rewards.alignment.shape[-1]
    if n < 2 and baseline != "reinforce":
        raise ValueError(f"baseline={baseline} needs n >= 2 samples per context, got n={n}; use baseline=reinforce")
    if baseline == "rloo_corrected":
        return rloo_advantages(rewards, alpha)
    reward = rewards.alignment - alpha * rewards.diversity
    if baseline == "rloo":
        return reward - (reward.sum(-1, keepdim=True) - reward) / (n - 1)
    if baseline == "group_norm":
        return group_normalized_advantages(reward, "group")
    return reward


FLAT_TOLERANCE = 1e-6
"""Relative tolerance under which a group's rewards count as all equal (float rounding)."""


def flat_groups(rewards: Tensor, tolerance: float = FLAT_TOLERANCE) -> Tensor:
    """``(...)`` bool: the groups of rewards ``(..., n)`` (the n samples of one context) whose rewards are
    all equal,

        max_j r_j - min_j r_j <= tolerance * max(1, max_j |r_j|).

    Such a group carries no preference between its samples: its advantages are 0 under ``rloo`` and
    ``group_norm`` (and under ``rloo_corrected`` when the alignment and diversity terms are flat too),
    so in a token mean its tokens only dilute the other groups' gradient. ``method.skip_flat_groups``
    leaves these groups out of the policy gradient (DAPO's dynamic sampling without the resampling).
    """
    if rewards.ndim < 1:
        raise ValueError(f"rewards must have shape (..., n); got a scalar {rewards!r}")
    spread = rewards.amax(-1) - rewards.amin(-1)
    return spread <= tolerance * rewards.abs().amax(-1).clamp_min(1.0)


def group_normalized_advantages(rewards: Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO advantages ``(r_j - mean_group r) / (std + eps)`` for rewards ``(..., n)``.

    ``scale_rewards`` follows TRL: ``"group"`` divides by the standard deviation of each
    group, ``"batch"`` by the standard deviation of all rewards, ``"none"`` does not divide.
    Standard deviations are unbiased (as ``torch.std``) and taken as 0 for a single value,
    so equal rewards give zero advantages, never NaN.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not supported; use one of {SCALE_REWARDS}")
    if rewards.ndim < 1:
        raise ValueError(f"rewards must have shape (..., n); got a scalar {rewards!r}")
    if eps <= 0:
        raise ValueError(f"eps={eps!r} must be > 0 so that equal rewards give zero advantages")
    rewards = rewards.float()
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    else:
        std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(rewards)
    return centred / (std + eps)
