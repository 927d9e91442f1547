"""Paired comparison of two models evaluated on the same held-out contexts with the same random numbers.

Every model is scored on the same contexts, and the CFM estimate of a context draws its samples from
the same seeded generator for every model. For per-context values ``a_i`` (a model) and ``b_i`` (the
reference), the paired difference ``d_i = a_i - b_i`` removes what the two share: the ground-truth
term ``||psi||^2`` of the unbiased CFM estimate cancels exactly, and the difficulty of each context
largely cancels too. So ``mean(d)`` has a far smaller standard error than the difference of two
independently estimated means.

Reported per comparison:

- ``mean`` = ``mean_i d_i`` and ``se`` = ``std(d) / sqrt(N)`` over the ``N`` units;
- the normal 95% interval ``mean +- 1.96 se``;
- a two-sided sign-flip permutation p-value for ``E d = 0``: under the null each ``d_i`` is
  symmetric about 0, so flipping signs at random gives the null distribution of ``|mean(d)|``;
  ``p = (1 + #{|mean(s * d)| >= |mean(d)|}) / (1 + permutations)``.

Contexts that share text (the blocks of one chunk) are not independent: pass per-chunk means
(``cluster`` rows of a ``(chunks, blocks)`` tensor, :func:`paired_by_chunk`) for the conservative
interval; both are reported by the evaluation.

A unit that is NaN for both models is one neither scored (a context ``eval.anchors=answer`` leaves out)
and is left out of the comparison; a unit NaN for one model only is an error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

Z95 = 1.959963984540054


@dataclass(frozen=True)
class PairedDiff:
    """``mean(a - b)`` over ``n`` paired units, its standard error, the 95% interval and the
    two-sided sign-flip permutation p-value."""

    mean: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def excludes_zero(self) -> bool:
        """The 95% interval lies wholly on one side of 0."""
        return self.ci_low > 0 or self.ci_high < 0


def _as_vector(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def scored_units(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-unit arrays flattened, without the units neither model scored (NaN in both)."""
    a, b = _as_vector(a), _as_vector(b)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same units for both models, got {a.numel()} and "
                         f"{b.numel()} values: evaluate both with the same held-out chunks, seed and settings")
    keep = ~(a.isnan() & b.isnan())
    a, b = a[keep], b[keep]
    for name, t in (("a", a), ("b", b)):
        if not torch.isfinite(t).all():
            raise ValueError(f"paired comparison: {name} holds non-finite values")
    return a, b


def chunk_means(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per-chunk means of ``(chunks, blocks)`` per-context values over the scored (not NaN) contexts; NaN
    for a chunk with none."""
    values = torch.as_tensor(values, dtype=torch.float64)
    scored = ~values.isnan()
    return values.nan_to_num(0).sum(-1) / scored.sum(-1).where(scored.any(-1), torch.nan)


def paired_difference(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor, *,
                      n_permutations: int = 10_000, seed: int = 0) -> PairedDiff:
    """Paired difference ``a - b`` of two equally long per-unit arrays (units = contexts or chunks; units
    NaN in both are left out); ``n_permutations=0`` skips the p-value (NaN)."""
    a, b = scored_units(a, b)
    if a.numel() < 2:
        raise ValueError(f"paired comparison needs >= 2 units, got {a.numel()}")
    d = a - b
    n = d.numel()
    mean = d.mean().item()
    se = d.std().item() / math.sqrt(n)
    p = sign_flip_p_value(d, n_permutations, seed) if n_permutations else math.nan
    return PairedDiff(mean, se, mean - Z95 * se, mean + Z95 * se, p, n)


def sign_flip_p_value(d: torch.Tensor, n_permutations: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of ``mean(d) = 0`` by random sign flips (Monte Carlo, with the observed
    statistic counted once so that ``p > 0``)."""
    d = d.double().flatten()
    observed = d.mean().abs()
    generator = torch.Generator().manual_seed(seed)
    hits, done, batch = 0, 0, 2_000
    while done < n_permutations:
        k = min(batch, n_permutations - done)
        signs = torch.randint(0, 2, (k, d.numel()), generator=generator, dtype=torch.float64) * 2 - 1
        # a tolerance so that exact ties (e.g. all |d| equal) count as "at least as extreme"
        hits += int(((signs @ d).abs() / d.numel() >= observed - 1e-12).sum())
        done += k
    return (1 + hits) / (1 + n_permutations)


def paired_by_chunk(a: torch.Tensor, b: torch.Tensor, **kwargs) -> PairedDiff:
    """Paired difference with chunks as the units: ``a``, ``b`` are (chunks, blocks) per-context values;
    each chunk's scored blocks are averaged first (blocks of one chunk share text)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"paired_by_chunk needs two (chunks, blocks) arrays of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return paired_difference(chunk_means(a), chunk_means(b), **kwargs)
