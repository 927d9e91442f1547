"""Reports for people: markdown tables, matplotlib figures (Agg backend, no display needed, imported on
first use), every file written atomically (:mod:`ebft.files`).

Used by the evaluation's comparison tables and FM-profile plot (:mod:`ebft.eval.report`), the sweep
collector (``experiments/collect.py``) and the small reproduction's README and figures
(``experiments/repro``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ebft.files import atomic_path

MISSING = "–"
"""What a table shows for a value that is missing (None) or not finite."""


# ------------------------------------------------------------------------------------ tables

def cell(value, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals, :data:`MISSING` for None and non-finite floats."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table: the first column left-aligned (labels), the others right-aligned (numbers);
    cells formatted by :func:`cell`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


# ------------------------------------------------------------------------------------ figures

def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, tight: bool = False) -> Path:
    """Save ``fig`` as ``path`` (format from its suffix, 120 dpi) atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png", **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
    return path


@dataclass(frozen=True)
class Line:
    """One line of a panel: points ``(x, y)``; ``label`` None keeps it out of the legend; ``style``
    goes to ``Axes.plot`` (colour, width, marker, ...)."""

    points: Sequence[tuple[float, float]]
    label: str | None = None
    style: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    title: str
    lines: Sequence[Line]
    xlabel: str = "optimizer step"
    ylabel: str | None = None


def line_panels(panels: Sequence[Panel], path: str | os.PathLike, legend_columns: int = 3) -> Path | None:
    """Panels side by side, one legend for all below them (from the first panel's labelled lines);
    None (nothing written) when no panel has a point."""
    if not any(line.points for panel in panels for line in panel.lines):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel.lines:
            if line.points:
                ax.plot(*zip(*line.points), label=line.label, **line.style)
        ax.set_xlabel(panel.xlabel)
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(legend_columns, len(labels)), fontsize=7,
                   bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(labels) + legend_columns - 1) // legend_columns)))
    fig.tight_layout()
    return save_figure(fig, path, tight=True)


@dataclass(frozen=True)
class ProfileCurve:
    """The FM profile of one model (or the seed mean of one variant): CFM at each completion length
    ``lengths`` with its standard error (NaN: none)."""

    label: str
    lengths: Sequence[int]
    cfm: Sequence[float]
    se: Sequence[float]
    style: dict = field(default_factory=dict)


def profile_plot(curves: Sequence[ProfileCurve], path: str | os.PathLike, title: str,
                 ylabel: str = "conditional feature-matching loss") -> Path | None:
    """The FM profile (paper Figures 1 and 2): CFM against completion length G on a log2 axis, one
    curve per entry with standard-error bars; None (nothing written) without curves."""
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c in curves:
        ax.errorbar(c.lengths, c.cfm, yerr=[0 if s is None or math.isnan(s) else s for s in c.se], marker="o",
                    capsize=3, label=c.label, **c.style)
    lengths = curves[0].lengths
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(g) for g in lengths])
    ax.set_xlabel("completion length G (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
