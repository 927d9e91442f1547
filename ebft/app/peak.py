"""Measure the peak memory of real training steps: the run's own module, data and Trainer (the recipe of
:mod:`ebft.app.run` without validation, checkpoints or export) for a few optimizer steps, and the
peak of the memory the step allocated: on CUDA ``torch.cuda.max_memory_allocated`` (live tensors), on
CPU the peak resident set (``VmHWM``) above the resident set before the module was built. The memory
planner (``ebft.app.memory``) is checked against these numbers.

On CPU, glibc keeps freed memory of mid-sized blocks for reuse; :func:`measure` runs in a child process
whose environment fixes the mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
resident set as they do the CUDA allocator's count of live tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback

from ebft.app.trainer import build_trainer
from ebft.config import TrainSettings, compose_config, train_settings
from ebft.models.loading import load_tokenizer

GIB = 2 ** 30
# What a measurement adds to the user's overrides: no validation, calibration or in-training checkpoints.
MEASURE_OVERRIDES = ("trainer.limit_val_batches=0", "eval.every_n_steps=0", "eval.cfm_train_chunks=0",
                     "trainer.enable_progress_bar=false", "logger=csv")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


class PeakMeter:
    """Peak bytes allocated since :meth:`start` on ``device``."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
            self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


class StepPeaks(Callback):
    """The meter's peak after every optimizer step, and the step's wall time."""

    def __init__(self, meter: PeakMeter):
        self.meter, self.peaks, self.seconds, self._t = meter, [], [], time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():   # mid-accumulation: the optimizer step has not run
            return
        now = time.perf_counter()
        self.peaks.append(self.meter.peak())
        self.seconds.append(now - self._t)
        self._t = now


def measure_in_process(settings: TrainSettings) -> dict:
    """Peak bytes above the baseline over ``settings``' run (its ``trainer.max_steps`` optimizer steps),
    per step; the baseline is taken after the data and tokenizer are loaded, before the module."""
    run = settings.run
    L.seed_everything(settings.seed, workers=True)
    tokenizer = load_tokenizer(settings.model.name)
    module_cls = get_class(run.module)
    datamodule = module_cls.make_datamodule(settings, tokenizer)
    datamodule.setup("fit")
    meter = PeakMeter(settings.device)
    meter.start()
    module = module_cls(settings, tokenizer)
    setup = meter.peak()
    peaks = StepPeaks(meter)
    trainer = build_trainer(settings, Path(run.output_dir), [peaks])
    trainer.fit(module, datamodule=datamodule)
    return {"setup_bytes": setup, "step_peak_bytes": peaks.peaks, "step_seconds": peaks.seconds,
            "device": settings.device, "torch": torch.__version__}


def measure(overrides: list[str], steps: int = 2, timeout: float | None = None) -> dict:
    """:func:`measure_in_process` of ``python train.py <overrides>`` for ``steps`` optimizer steps, in a child
    process (its own resident set; on CPU the fixed mmap threshold); the peak of the last step is the
    steady state (AdamW's moments exist from the first step on)."""
    with tempfile.TemporaryDirectory(prefix="ebft-peak-") as out:
        args = [*overrides, *MEASURE_OVERRIDES, f"trainer.max_steps={steps}", f"output_dir={out}"]
        code = "import json, sys; from ebft.app.peak import _child; print('PEAK ' + json.dumps(_child(sys.argv[1:])))"
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **MALLOC_ENV}, cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    if done.returncode or not lines:
        raise RuntimeError(f"measurement of {overrides} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][5:])


def _child(overrides: list[str]) -> dict:
    with contextlib.redirect_stdout(sys.stderr):
        return measure_in_process(train_settings(compose_config("train", overrides)))
