"""The callbacks of a training run: the validation history and the step timer of the end-of-run summary,
and the stop on SIGTERM / SIGINT that finishes the optimizer step under way."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class ValidationHistory(Callback):
    """Keeps (step, val/ce) pairs for the end-of-run summary."""

    def __init__(self):
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if "val/ce" in trainer.callback_metrics and not trainer.sanity_checking:
            self.history.append((trainer.global_step, float(trainer.callback_metrics["val/ce"])))

class StepTimer(Callback):
    """Wall time of the training batches (forward, backward and optimizer step; not validation):
    ``perf/batch_s`` per batch, and seconds per optimizer step over this process's steps for the
    summary. On an accelerator the host can run ahead of the device, so single values jitter
    (there is no synchronisation per step); their sum is right up to the last step's queue."""

    def __init__(self):
        self.seconds, self.first_step, self._start = 0.0, 0, 0.0

    def on_train_start(self, trainer, pl_module):
        self.first_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._start
        self.seconds += seconds
        pl_module.log("perf/batch_s", seconds, batch_size=1)

    def per_step(self, trainer) -> float | None:
        steps = trainer.global_step - self.first_step
        return self.seconds / steps if steps > 0 else None

class Interrupted(RuntimeError):
    """Training stopped on SIGTERM / SIGINT after saving ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved {checkpoint}")

class StopOnSignal(Callback):
    """On SIGTERM (``timeout``, ``docker stop``, Slurm preemption) or SIGINT (Ctrl-C) during training:
    finish the optimizer step under way and stop the fit; :func:`train` then saves the checkpoint and
    raises :class:`Interrupted`. A second signal of either kind stops at once (nothing more is saved:
    the run resumes from its last checkpoint).

    A stop therefore needs a grace period of one optimizer step plus a checkpoint write; the first
    step's time is logged as that grace, so a scheduler's kill delay can be set from it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self.stopped, self._previous, self._step = None, False, {}, 0
        self._step_started, self.step_seconds = None, None

    def _note(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        pace = f" (a step takes about {self.step_seconds:.1f} s here)" if self.step_seconds else ""
        print(f"\n{signal.Signals(signum).name}: stopping after this optimizer step{pace}, saving a checkpoint; "
              "a second signal stops at once ...", file=sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():  # Lightning's own SIGTERM handler is replaced
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step_started is None or trainer.global_step > self._step:
            self._step_started = time.monotonic()
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._step and self.step_seconds is None:
            self.step_seconds = time.monotonic() - self._step_started
            log.info("one optimizer step took %.1f s: stopping on SIGTERM needs about that long plus a checkpoint "
                     "write (give the scheduler that grace, docs/cluster.md)", self.step_seconds)
        if self.signum is not None and trainer.global_step > self._step:
            trainer.should_stop = self.stopped = True

    def teardown(self, trainer, pl_module, stage):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
