"""Comparison tables and the FM-profile plot from per-model result files.

Every evaluated model leaves one ``results.json``; a report gathers all of them under a directory
(the run directory, or the sweep directory of a multirun) and writes

- ``results.md`` / ``results.csv``: one row per model, columns in the shape of the paper's Table 1
  (CE, FM, then per benchmark greedy and pass@k, or greedy and best-of-k);
- ``fm_profile.csv`` / ``fm_profile.png``: CFM against completion length G, one curve per model
  with its standard error (paper Figures 1 and 2).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Sequence

RESULTS_FILE = "results.json"
CALIBRATION_COLUMNS = {"ce": "CE", "ce_answer": "CE answer", "cfm": "FM", "cfm_whitened": "FM whitened"}


def write_json(data: dict, path: Path) -> Path:
    """Write ``data`` as JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def collect(root: str | os.PathLike) -> list[dict]:
    """All ``results.json`` under ``root``, in evaluation order (multirun job, then position in ckpt)."""
    results = [json.loads(p.read_text()) for p in Path(root).rglob(RESULTS_FILE)]
    return sorted(results, key=lambda r: tuple(r["order"]))


def columns_of(result: dict) -> dict[str, float]:
    """The table columns of one result: calibration, then ``"<benchmark> <metric>"``."""
    row = {name: result["calibration"][key] for key, name in CALIBRATION_COLUMNS.items()
           if key in result.get("calibration", {})}
    for bench, scores in result.get("downstream", {}).items():
        row.update({f"{bench} {metric}": value for metric, value in scores.items()})
    return row


def table(results: Sequence[dict]) -> tuple[list[str], list[list]]:
    """Header and rows (``model`` first); a column missing for a model stays empty."""
    per_model = [columns_of(r) for r in results]
    header = ["model", *dict.fromkeys(c for row in per_model for c in row)]
    return header, [[r["model"], *(row.get(c) for c in header[1:])] for r, row in zip(results, per_model)]


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return "–" if value is None else str(value)


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def write_profile(results: Sequence[dict], root: Path) -> list[Path]:
    """``fm_profile.csv`` and ``fm_profile.png`` for the results that have a profile."""
    profiled = [r for r in results if r.get("profile")]
    if not profiled:
        return []
    csv_path, png_path = root / "fm_profile.csv", root / "fm_profile.png"
    points = [[r["model"], *point] for r in profiled for point in zip(*(r["profile"][k] for k in ("G", "cfm", "se")))]
    _write_csv(csv_path, ["model", "G", "cfm", "se"], points)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in profiled:
        p = r["profile"]
        ax.errorbar(p["G"], p["cfm"], yerr=[0 if math.isnan(s) else s for s in p["se"]], marker="o", capsize=3,
                    label=r["model"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(profiled[0]["profile"]["G"], [str(g) for g in profiled[0]["profile"]["G"]])
    ax.set_xlabel("completion length G (tokens)")
    ax.set_ylabel("conditional feature-matching loss")
    first = profiled[0]
    ax.set_title(f"FM profile, {first['task']} (n={first['settings']['cfm_samples']} samples, "
                 f"temperature {first['settings']['cfm_temperature']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return [csv_path, png_path]


def write_report(root: str | os.PathLike) -> str:
    """Gather every result under ``root``, write the tables and the profile plot; return the markdown table."""
    root = Path(root)
    results = collect(root)
    if not results:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}: evaluate a model first")
    header, rows = table(results)
    text = markdown(header, rows)
    (root / "results.md").write_text(text + "\n")
    _write_csv(root / "results.csv", header, rows)
    write_profile(results, root)
    return text
