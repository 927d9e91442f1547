"""Run directories: what a training run writes where, and the checks before it writes anything.

A run never destroys earlier results: a directory that holds another run is refused unless the run
resumes it in place (``ckpt_path=last`` or the directory itself; ``metrics.csv`` is then appended to,
without the rows of steps after the checkpoint a crashed run repeats); a directory whose run stopped
before its first checkpoint is named with both ways out; a checkpoint is checked before resuming
(readable, same method and model); the temporary files of an interrupted atomic write are removed.
"""

from __future__ import annotations

import csv
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ebft.config import ConfigError, RunSettings
from ebft.models.loading import HF_SUBDIR
from ebft.files import LOCK_FILE, DirectoryBusy, write_csv

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
LAST = Path("checkpoints") / "last.ckpt"


RUN_OUTPUTS = (METRICS_FILE, "checkpoints", HF_SUBDIR, "adapter")
"""What a training run writes into its directory; a directory holding one of them holds a run."""

def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> Path | None:
    """A ``.ckpt`` file as is; a run directory -> its ``checkpoints/last.ckpt``; ``last`` -> this run's."""
    if not ckpt_path:
        return None
    if str(ckpt_path) == "last":
        earlier = previous_run(output_dir)
        if earlier and not (output_dir / LAST).is_file():
            raise ConfigError(without_checkpoint(output_dir, earlier))
        if not (output_dir / LAST).is_file():
            raise ConfigError(f"ckpt_path=last: {output_dir / LAST} does not exist; to resume a run in place set "
                              "hydra.run.dir=<its directory> too, or give ckpt_path=<run dir or .ckpt file>")
        return output_dir / LAST
    path = Path(str(ckpt_path))
    return path / LAST if path.is_dir() else path

def previous_results(output_dir: Path) -> list[str]:
    """What is in ``output_dir`` besides Hydra's ``.hydra/`` and ``*.log``: kept when a run fails."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name not in (".hydra", LOCK_FILE) and p.suffix != ".log")

def previous_run(output_dir: Path) -> list[str]:
    """The outputs of an earlier training run in ``output_dir`` (metrics, checkpoints, model). Files of
    other tools (e.g. a driver's job record beside the run) do not make it a run."""
    return [name for name in RUN_OUTPUTS if (output_dir / name).exists()]

def without_checkpoint(output_dir: Path, earlier: list[str]) -> str:
    """The message for a directory holding a run that stopped before its first checkpoint."""
    return (f"output_dir {output_dir} holds a run that stopped before its first checkpoint ({', '.join(earlier)}; "
            f"no {LAST}), so it cannot be resumed: delete it (rm -r {output_dir}) to start again there, or give "
            "a new directory (leave hydra.run.dir at its default)")

def checkpoint_step(path: Path) -> int:
    """The optimizer steps a checkpoint was saved after (read without loading the weights)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("global_step", 0))

def check_checkpoint(path: Path, method: str, model: str, quantization: str | None = None) -> None:
    """``path`` is a readable checkpoint of ``method`` and ``model``, trained over a base quantised as
    ``quantization`` (``model.quantization``: its adapters belong to that base) (read without loading the
    weights)."""
    if not path.is_file():
        raise ConfigError(f"ckpt_path: {path} does not exist; give a .ckpt file or a run dir with {LAST}")
    fix = "resume from another checkpoint of the run (checkpoints/), or start a new run without ckpt_path"
    if path.stat().st_size == 0:
        raise ConfigError(f"ckpt_path: {path} is empty (0 bytes: a save or copy that did not finish); {fix}")
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise ConfigError(f"ckpt_path: {path} is not a readable checkpoint, truncated or damaged ({err}); {fix}") \
            from None
    saved_cfg = saved.get("hyper_parameters", {}).get("cfg", {}) if isinstance(saved, dict) else {}
    for group, now in (("method", method), ("model", model)):
        was = saved_cfg.get(group, {}).get("name")
        if was is not None and was != now:
            raise ConfigError(f"ckpt_path: {path} is a checkpoint of {group}.name={was}, not {group}.name={now}: "
                              f"resume it with {group}={was if group == 'method' else '<its model config>'}, or "
                              "start a new run without ckpt_path")
    if "model" in saved_cfg:
        was = saved_cfg["model"].get("quantization")
        if was != quantization:
            raise ConfigError(f"ckpt_path: {path} was trained with model.quantization={was or 'null'}, not "
                              f"{quantization or 'null'}: its adapters belong to that base; resume it with "
                              f"model.quantization={was or 'null'}, or start a new run without ckpt_path")

def prepare_output_dir(run: RunSettings, method: str, model: str,
                       quantization: str | None = None) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from. A directory holding another run is refused
    unless this run resumes it in place; stale ``*.tmp`` files of a crashed run are removed."""
    output_dir = Path(run.output_dir)
    ckpt_path = resolve_ckpt_path(run.ckpt_path, output_dir)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, method, model, quantization)
    in_place = ckpt_path is not None and ckpt_path.resolve().parent.parent == output_dir.resolve()
    earlier = previous_run(output_dir)
    if earlier and not in_place and not (output_dir / LAST).is_file():
        raise ConfigError(without_checkpoint(output_dir, earlier))
    if earlier and not in_place:
        raise ConfigError(f"output_dir {output_dir} already holds a run ({', '.join(earlier)}): resume it with "
                          f"ckpt_path=last hydra.run.dir={output_dir}, or leave hydra.run.dir at its default for "
                          "a new directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(output_dir)
    return output_dir, ckpt_path

@contextmanager
def removed_if_empty(output_dir: str | Path | None) -> Iterator[None]:
    """When the block fails, remove ``output_dir`` if it holds nothing worth keeping (only Hydra's
    ``.hydra/`` and logs): no stray empty run directory. A directory another run holds is left alone."""
    try:
        yield
    except DirectoryBusy:
        raise
    except BaseException:
        if output_dir is not None and not previous_results(Path(output_dir)):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def remove_stale_tmp(output_dir: Path) -> None:
    """The temporary files of an atomic write a crash interrupted (``*.tmp``: files and folders)."""
    for tmp in [*output_dir.glob("*.tmp"), *output_dir.glob("checkpoints/*.tmp")]:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

def forget_rows_after(metrics_file: Path, step: int) -> None:
    """Drop the rows of ``step`` and later from a run's ``metrics.csv`` (atomically): a run resumed in place
    from the checkpoint of ``step`` trains those steps again, so a crash after that checkpoint would
    otherwise leave them twice."""
    if not metrics_file.is_file():
        return
    with open(metrics_file, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(reader)
    if header is None or "step" not in header:
        return
    at = header.index("step")
    kept = [r for r in rows if not r[at] or int(float(r[at])) < step]
    if len(kept) < len(rows):
        log.info("resuming at step %d: %d metric rows of steps the crashed run did not checkpoint are dropped",
                 step, len(rows) - len(kept))
        write_csv(metrics_file, header, kept)
