"""The learning-rate sweep: runs per method at several lrs, chosen on the held-out VALIDATION chunks.

Every run logs ``val/cfm`` on the same fixed held-out chunks with the same random numbers, and its
first evaluation is the base model's (identical in every run), so final ``val/cfm`` values of two runs
are a paired comparison; ``val/cfm_change_se`` is the paired standard error of each run's change.

Rule (the same for every method): among the runs that finished with finite numbers, take the lowest
final val CFM; every lr whose final val CFM is within two standard errors of it (the paired change
errors of both runs combined) counts as tied, and among the tied ones the lowest final val CE wins.
The downstream benchmarks and the comparison's held-out chunks are never looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from experiments.collect import load_run
from experiments.repro.jobs import read_record
from experiments.repro.settings import ReproError


@dataclass(frozen=True)
class SweepPoint:
    """The final validation numbers of one sweep run."""

    variant: str
    method: str
    lr: float
    dir: str
    ok: bool
    val_ce: float = math.nan
    val_cfm: float = math.nan
    val_cfm_se: float = math.nan
    start_ce: float = math.nan
    start_cfm: float = math.nan


def _last(run, key: str) -> float:
    value = run.last(key)
    return math.nan if value is None else float(value)


def _first(run, key: str) -> float:
    series = run.series(key)
    return float(series[0][1]) if series else math.nan


def read_point(out: Path, entry: dict) -> SweepPoint:
    """The :class:`SweepPoint` of the sweep run ``entry`` (from plan.json) under ``out``."""
    directory = out / entry["dir"]
    record = read_record(directory)
    base = SweepPoint(entry["variant"], entry["method"], float(entry["lr"]), entry["dir"], False)
    if record is None or record.get("returncode") != 0 or not (directory / "metrics.csv").is_file():
        return base
    run = load_run(directory)
    se = _last(run, "val/cfm_change_se")
    point = SweepPoint(base.variant, base.method, base.lr, base.dir, True, _last(run, "val/ce"),
                       _last(run, "val/cfm"), se if math.isfinite(se) else _last(run, "val/cfm_se"),
                       _first(run, "val/ce"), _first(run, "val/cfm"))
    finite = math.isfinite(point.val_ce) and (math.isfinite(point.val_cfm) or math.isnan(point.start_cfm))
    return point if finite else SweepPoint(base.variant, base.method, base.lr, base.dir, False)


def choose(points: list[SweepPoint]) -> SweepPoint:
    """The chosen point of one method's sweep (module docstring)."""
    usable = [p for p in points if p.ok]
    if not usable:
        names = ", ".join(f"{p.variant} lr={p.lr:g}" for p in points)
        raise ReproError(f"every lr-sweep run failed or diverged ({names}); lower repro.lr_sweep.lrs "
                         "and look at the stdout.log of those runs")
    with_cfm = [p for p in usable if math.isfinite(p.val_cfm)]
    if not with_cfm:
        return min(usable, key=lambda p: p.val_ce)
    best = min(with_cfm, key=lambda p: p.val_cfm)

    def tied(p: SweepPoint) -> bool:
        se = math.sqrt(sum(x ** 2 for x in (p.val_cfm_se, best.val_cfm_se) if math.isfinite(x)))
        return p.val_cfm - best.val_cfm <= 2 * se

    return min((p for p in with_cfm if tied(p)), key=lambda p: p.val_ce)


def sweep_points(out: Path, entries: list[dict]) -> list[SweepPoint]:
    """The sweep runs ``entries`` (plan.json's ``sweep.runs``) read back."""
    return [read_point(out, entry) for entry in entries]


def chosen_lrs(points: list[SweepPoint]) -> dict[str, SweepPoint]:
    """Method -> its chosen sweep point."""
    by_method: dict[str, list[SweepPoint]] = {}
    for p in points:
        by_method.setdefault(p.method, []).append(p)
    return {method: choose(group) for method, group in by_method.items()}
