"""Collect a sweep (a Hydra multirun directory) into one table and one figure.

    python -m experiments.collect multirun/qa_code/2026-01-31_12-00-00

Every run directory under the sweep that holds a ``metrics.csv`` (the CSV logger's) is one row:
the overrides that differ between runs (from the run's ``.hydra/overrides.yaml``), the last
``val/ce``, ``val/cfm`` and ``train/reward`` logged, and the optimizer steps taken. Written next to
the runs: ``summary.md``, ``summary.csv`` and ``curves.png`` (validation CE and CFM over steps,
one line per run); the markdown table is also printed.
"""

from __future__ import annotations

import argparse
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ebft.files import write_csv, write_text
from ebft.reporting import Line, Panel, line_panels, markdown_table

METRICS = ("val/ce", "val/cfm", "train/reward")
CURVES = ("val/ce", "val/cfm")


@dataclass
class Run:
    """One run of a sweep: its overrides and its logged metrics."""

    path: Path
    overrides: dict[str, str]
    rows: list[dict[str, str]] = field(repr=False)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every row that logged ``key``."""
        return [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in (None, "")]

    def last(self, key: str) -> float | None:
        values = self.series(key)
        return values[-1][1] if values else None

    @property
    def steps(self) -> int:
        """Optimizer steps: training metrics are logged at steps 0..S-1, validation at the step reached."""
        train = [int(r["step"]) + 1 for r in self.rows if any(k.startswith("train/") and v for k, v in r.items())]
        val = [int(r["step"]) for r in self.rows if any(k.startswith("val/") and v for k, v in r.items())]
        return max(train + val, default=0)


def _job_order(path: Path) -> tuple[int, str]:
    """Hydra names sweep runs ``<job number>_<overrides>``: sort by the number, then the name."""
    match = re.match(r"(\d+)", path.name)
    return (int(match.group(1)) if match else -1, str(path))


def load_run(run_dir: Path) -> Run:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    overrides = dict(item.split("=", 1) for item in items or [] if "=" in item)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return Run(run_dir, overrides, rows)


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every directory under ``sweep_dir`` with a ``metrics.csv``, in job order."""
    dirs = sorted({p.parent for p in sweep_dir.rglob("metrics.csv")}, key=_job_order)
    return [load_run(d) for d in dirs]


def split_overrides(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose value differs between runs (the table's columns) and the shared ones."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    varying = [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]
    common = {k: runs[0].overrides[k] for k in keys if k not in varying}
    if len(runs) == 1:
        return keys, {}
    return varying, common


def job_label(path: Path) -> str:
    """The job number Hydra puts in front of a sweep run's directory name, else the name."""
    number = _job_order(path)[0]
    return str(number) if number >= 0 else path.name


def table(runs: list[Run], columns: list[str]) -> tuple[list[str], list[list[str | None]]]:
    """Header and one row per run: job, the ``columns`` overrides, metrics (4 decimals), steps; None
    where a run has no such override or metric."""
    header = ["job", *columns, *METRICS, "steps"]
    rows = []
    for run in runs:
        values = [run.last(k) for k in METRICS]
        rows.append([job_label(run.path), *(run.overrides.get(k) for k in columns),
                     *(None if v is None else f"{v:.4f}" for v in values), str(run.steps)])
    return header, rows


def markdown(header: list[str], rows: list[list[str | None]], common: dict[str, str]) -> str:
    """The table, under a line with the overrides every run shares."""
    shared = ["shared overrides: " + " ".join(f"{k}={v}" for k, v in common.items()), ""] if common else []
    return "\n".join([*shared, markdown_table(header, rows)]) + "\n"


def plot(runs: list[Run], columns: list[str], path: Path) -> Path | None:
    """Validation CE and CFM over optimizer steps, one line per run, labelled by its overrides."""
    keys = [k for k in CURVES if any(run.series(k) for run in runs)] or ["val/ce"]
    style = {"marker": "o", "markersize": 3}
    labels = [" ".join(f"{k}={run.overrides.get(k, '')}" for k in columns) or run.path.name for run in runs]
    return line_panels([Panel(key, [Line(run.series(key), label, style) for run, label in zip(runs, labels)],
                              ylabel=key) for key in keys], path)


def collect(sweep_dir: str | Path) -> str:
    """Write summary.md, summary.csv and curves.png into ``sweep_dir``; return the markdown table."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(f"{sweep_dir} is not a directory; give a sweep dir "
                         "(hydra.sweep.dir, e.g. multirun/qa_code/<time>)")
    runs = find_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"no run under {sweep_dir} has a metrics.csv; is it a sweep dir of runs with logger=csv?")
    columns, common = split_overrides(runs)
    header, rows = table(runs, columns)
    text = markdown(header, rows, common)
    write_text(sweep_dir / "summary.md", text)
    write_csv(sweep_dir / "summary.csv", header, rows)
    plot(runs, columns, sweep_dir / "curves.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the multirun directory (hydra.sweep.dir) holding the runs")
    args = parser.parse_args(argv)
    print(collect(args.sweep_dir), end="")


if __name__ == "__main__":
    main()
