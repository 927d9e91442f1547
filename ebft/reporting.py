"""Writing reports: markdown tables, CSV and JSON files, matplotlib figures, every file atomically.

One module for everything that leaves numbers on disk for people to read: the evaluation's
comparison tables and FM-profile plot (:mod:`ebft.eval.report`), the sweep collector
(``experiments/collect.py``) and the small reproduction's README and figures
(``experiments/repro``). A file is written to ``<name>.tmp`` beside its destination and renamed
over it, so a reader (or a crash) never sees half a file. Figures use matplotlib's Agg backend
(no display needed), imported on first use.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

MISSING = "–"
"""What a table shows for a value that is missing (None) or not finite."""


# ------------------------------------------------------------------------------------ files

def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, then rename); parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(data, path: str | os.PathLike, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, not escaped) atomically."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write a CSV file (a header line, then ``rows``; None is an empty cell) atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return write_text(path, buffer.getvalue())


LOCK_FILE = ".lock"
"""Held (``flock``) by the process writing into a run or evaluation directory."""


class DirectoryBusy(RuntimeError):
    """Another process is writing into the directory."""


class DiskFull(RuntimeError):
    """No space left while writing a file: one line naming the path and the space it needed."""

    def __init__(self, path: str | os.PathLike, needed_bytes: int | None = None):
        path = Path(path)
        free = shutil.disk_usage(next((p for p in (path, *path.parents) if p.exists()), Path("."))).free
        need = f" (it needs about {needed_bytes / 2**20:,.0f} MiB)" if needed_bytes else ""
        super().__init__(f"no space left on the device writing {path}{need}; {free / 2**20:,.0f} MiB free there: "
                         "free space or write to another disk, then run again (a run resumes from its last checkpoint)")


@contextmanager
def disk_full_names(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn ``ENOSPC`` raised inside the block into :class:`DiskFull` naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DiskFull(path, needed_bytes) from None


@contextmanager
def directory_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (made if missing) while the block runs, so two processes
    never write into one directory at once. The lock is the kernel's (``flock`` on ``.lock``): it goes
    with the process, however that ends. Raises :class:`DirectoryBusy` when another process holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DirectoryBusy(f"{directory} is in use by {holder}: wait until it finishes, or give this {what} "
                                "another directory (hydra.run.dir=..., or leave it at its default)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} pid {os.getpid()}\n")
        handle.flush()
        try:
            yield directory
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png", **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
    os.replace(tmp, path)
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
