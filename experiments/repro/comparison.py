"""Paired comparisons of the reproduction's models, and its in-sample vs held-out curves.

Every model is evaluated on the same held-out units (chunks for CE, (chunk, block) contexts for CFM)
with the same random numbers, and ``evaluate.py`` keeps each model's per-unit values
(``per_context.json``). For a variant A against a reference B (SFT, or the base model):

- per seed s, the per-unit differences ``d_s = A_s - B_s`` (B_s: the reference at the same seed; the
  base model has one evaluation for all seeds);
- pooled over the seeds both have, ``d = mean_s d_s`` per unit, then :func:`ebft.eval.paired.paired_difference`
  over the units: mean, 95% interval, sign-flip p-value. The interval covers the estimator's noise on
  these units for these trained models; the spread between seeds is shown beside it (one value per seed).

The curves come from the runs' ``metrics.csv``: ``val/cfm_change`` (held-out chunks) and
``train/cfm_fixed_change`` (the run's first training chunks), each the paired change since the run's
first evaluation, against the number of training chunks seen.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.collect import load_run
from ebft.eval.paired import PairedDiff, paired_difference
from ebft.eval.report import UNITS_FILE

METRICS = (("FM", "calibration", "cfm"), ("FM whitened", "calibration", "cfm_whitened"), ("CE", "calibration", "ce"))
"""(label, evaluation part, key in per_context.json) of the paired metrics; the FM profile adds one per G."""


def units(model: dict, part: str) -> dict:
    """The per-unit values of ``model``'s result of ``part`` ({} when it has none yet)."""
    result = model.get(part)
    if not result:
        return {}
    path = Path(result["_call"]) / UNITS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _value(values: dict, key: str, g: str | None) -> torch.Tensor | None:
    found = values.get("profile", {}).get(g) if g else values.get(key)
    return None if found is None else torch.tensor(found, dtype=torch.float64)


@dataclass(frozen=True)
class Comparison:
    """A variant against a reference on one metric, pooled over seeds."""

    metric: str
    variant: str
    reference: str
    value: float          # the variant's mean over units and seeds
    reference_value: float
    diff: PairedDiff
    per_seed: dict[int, float]   # seed -> mean difference at that seed

    @property
    def outcome(self) -> str:
        """For metrics where lower is better: is the variant lower, beyond the 95% interval?"""
        if self.diff.ci_high < 0:
            return "yes (lower)"
        if self.diff.ci_low > 0:
            return "no (higher)"
        return "no (within noise)"


def compare(models: list[dict], variant: str, reference: str, metric: str, part: str, key: str,
            g: str | None = None) -> Comparison | None:
    """``variant`` - ``reference`` on one metric, paired per unit and per seed (module docstring)."""
    refs = [m for m in models if m["variant"] == reference]
    diffs, per_seed, a_means, b_means = [], {}, [], []
    for m in models:
        if m["variant"] != variant:
            continue
        ref = next((r for r in refs if r.get("seed") in (m.get("seed"), None)), None)
        a = _value(units(m, part), key, g)
        b = _value(units(ref, part), key, g) if ref else None
        if a is None or b is None or a.shape != b.shape:
            continue
        diffs.append(a - b)
        per_seed[m.get("seed")] = (a - b).mean().item()
        a_means.append(a.mean().item())
        b_means.append(b.mean().item())
    if not diffs or diffs[0].numel() < 2:
        return None
    pooled = torch.stack(diffs).mean(0)
    diff = paired_difference(pooled, torch.zeros_like(pooled))
    return Comparison(metric, variant, reference, statistics.fmean(a_means), statistics.fmean(b_means), diff,
                      per_seed)


def comparisons(models: list[dict], variant: str, reference: str, profile_lengths: list[int]) -> list[Comparison]:
    """FM, FM whitened, CE and the FM profile at every length: ``variant`` against ``reference``."""
    wanted = [*METRICS, *((f"FM G={g}", "profile", "cfm") for g in profile_lengths)]
    out = []
    for label, part, key in wanted:
        g = label.split("=")[1] if label.startswith("FM G=") else None
        found = compare(models, variant, reference, label, part, key, g)
        if found is not None:
            out.append(found)
    return out


# ---------------------------------------------------------------------------------- curves

@dataclass(frozen=True)
class Curve:
    """One run's paired CFM changes since its first evaluation, by training chunks seen."""

    chunks: list[int]
    val: list[tuple[float, float]]      # (change, se) of val/cfm
    train: list[tuple[float, float]]    # (change, se) of train/cfm_fixed


def curve(directory: Path, batch_size: int) -> Curve | None:
    """The curve of the run in ``directory`` (None before its metrics.csv has a change)."""
    if not (directory / "metrics.csv").is_file():
        return None
    run = load_run(directory)

    def series(name: str) -> dict[int, tuple[float, float]]:
        ses = dict(run.series(f"{name}_change_se"))
        return {0: (0.0, 0.0), **{s: (v, ses.get(s, math.nan)) for s, v in run.series(f"{name}_change")}}

    val, train = series("val/cfm"), series("train/cfm_fixed")
    steps = sorted(set(val) & set(train)) if len(train) > 1 else sorted(val)
    if len(steps) < 2:
        return None
    nan = (math.nan, math.nan)
    return Curve([s * batch_size for s in steps], [val.get(s, nan) for s in steps], [train.get(s, nan) for s in steps])


def variant_curves(out: Path, models: list[dict], variant: str, batch_size: int) -> list[Curve]:
    """The curves of ``variant``'s runs that have logged a change (one per seed)."""
    return [c for m in models if m["variant"] == variant and m.get("dir")
            if (c := curve(out / m["dir"], batch_size)) is not None]


def final_changes(curves: list[Curve]) -> dict[str, tuple[float, float, int]]:
    """Mean over runs of the last (change, se) of each set, and the chunks seen."""
    out = {}
    for name in ("val", "train"):
        last = [getattr(c, name)[-1] for c in curves if math.isfinite(getattr(c, name)[-1][0])]
        if last:
            change = statistics.fmean(v for v, _ in last)
            se = math.sqrt(sum(s * s for _, s in last if math.isfinite(s))) / len(last)
            out[name] = (change, se, curves[0].chunks[-1])
    return out
