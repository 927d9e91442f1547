"""The numbers of the report's headline table: per-model metrics from evaluate.py's results, means
over seeds.

A model's metrics come from its results (``calibration``: CE and FM = the unbiased CFM estimate with
its whitened proxy; ``downstream``: per benchmark greedy and pass@k; the FM profile goes to the
figure). A variant's row is the mean and the sample standard deviation over its seeds. Whether one
variant beat another is decided by paired differences (:mod:`experiments.repro.comparison`), not here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from experiments.repro.plan import matches

@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for one value) and count of a metric over seeds."""

    mean: float
    sd: float
    n: int
    se: float = 0.0   # the estimator's standard error of the mean (FM only), over seeds

    @classmethod
    def of(cls, values: list[float], ses: list[float] | None = None) -> "Stat":
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return cls(math.nan, math.nan, 0)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        ses = [s for s in (ses or []) if s is not None and math.isfinite(s)]
        se = math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else 0.0
        return cls(statistics.fmean(values), sd, len(values), se)

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        value = f"{self.mean:.{digits}f}"
        return f"{value} ± {self.sd:.{digits}f}" if self.n > 1 else value


def model_metrics(calibration: dict | None, downstream: dict | None) -> dict[str, float]:
    """The table columns of one model: CE, FM (+ their extras), then ``<benchmark> <greedy|pass@k>``."""
    row: dict[str, float] = {}
    if calibration:
        c = calibration.get("calibration", {})
        for key, name in (("ce", "CE"), ("ce_answer", "CE answer"), ("cfm", "FM"), ("cfm_se", "FM se"),
                          ("cfm_whitened", "FM whitened")):
            if key in c:
                row[name] = float(c[key])
    if downstream:
        for bench, scores in downstream.get("downstream", {}).items():
            row.update({f"{bench} {metric}": float(v) for metric, v in scores.items()})
    return row


def attach_results(planned: list[dict], results: dict[str, list[dict]]) -> list[dict]:
    """``planned`` models (plan.json) with their result per evaluation part and their ``metrics``."""
    out = []
    for model in planned:
        found = {part: next((r for r in reversed(rs) if matches(model, r)), None) for part, rs in results.items()}
        out.append({**model, **found, "metrics": model_metrics(found.get("calibration"), found.get("downstream"))})
    return out


def rate_columns(models: list[dict]) -> list[str]:
    """The benchmark columns some model has (``HumanEval greedy``, ``HumanEval pass@1``, ...), in order."""
    return [k for k in dict.fromkeys(k for m in models for k in m["metrics"]) if is_rate(k)]


def variant_stats(models: list[dict], variant: str) -> dict[str, Stat]:
    """Metric -> :class:`Stat` over the seeds of ``variant`` (FM carries the CFM standard error)."""
    group = [m["metrics"] for m in models if m["variant"] == variant]
    keys = dict.fromkeys(k for g in group for k in g)
    stats = {k: Stat.of([g.get(k) for g in group]) for k in keys}
    if "FM" in stats:
        stats["FM"] = Stat.of([g.get("FM") for g in group], [g.get("FM se") for g in group])
    return stats


def is_rate(metric: str) -> bool:
    """Whether ``metric`` is a benchmark's solved fraction (``HumanEval greedy``, ``MBPP pass@4``)."""
    return metric.endswith(" greedy") or " pass@" in metric
