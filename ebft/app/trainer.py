"""The Lightning Trainer of a run: its strategy and precision, checkpoints written atomically and never
with non-finite weights, the logger (a CSV log that a resumed run appends to), and the accumulation
that ``global_batch`` sets."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ebft.app.strategies import MemoryEstimate, apply_global_batch, build_strategy, check_launch
from ebft.config import LoggerSettings, TrainSettings
from ebft.files import atomic_path, disk_full_names

# The training sampler resumes by itself (ResumableBatchSampler starts at the restored step), and the
# frozen feature network is in eval mode on purpose: Lightning's generic warnings about both mislead.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
# The CSV logger warns that a non-empty log folder will be cleared when fit starts after the initial
# validation wrote to it; it appends instead (metrics.csv keeps the step-0 validation).
warnings.filterwarnings("ignore", message=".*exists and is not empty. Previous log files.*")


def non_finite(state: dict) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]

def refuse_non_finite(state: dict, what: str) -> None:
    bad = non_finite(state)
    if bad:
        raise FloatingPointError(f"not writing {what}: {len(bad)} weight tensor(s) are not finite (first: {bad[0]}); "
                                 "lower method.lr, check the data, or use model.dtype=float32")

class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: a crash never leaves a torn file;
    one with non-finite weights is never written."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        refuse_non_finite(checkpoint["state_dict"], f"checkpoint {path}")
        with disk_full_names(path, tensor_bytes(checkpoint)), atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples: what saving it writes, roughly."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0

class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` (a run resumed in place) is appended to
    instead of deleted; its columns are kept."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r") as f:
                self.metrics_keys = sorted(f.readline().strip().split(","))

class AppendingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

def build_logger(logger: LoggerSettings, output_dir: Path):
    """The run's logger: ``metrics.csv`` (appended to on resume), TensorBoard or Weights & Biases."""
    kind = logger.kind
    if kind == "csv":
        return AppendingCSVLogger(save_dir=str(output_dir), name="", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        return TensorBoardLogger(save_dir=str(output_dir), name="", version="")
    from lightning.pytorch.loggers import WandbLogger
    return WandbLogger(project=logger.project, entity=logger.entity, offline=logger.offline, save_dir=str(output_dir))

def build_trainer(settings: TrainSettings, output_dir: Path, callbacks: list[Callback]) -> L.Trainer:
    """A Lightning Trainer from ``trainer`` (any Trainer keyword) plus our defaults; the strategy is built
    from its config and the accumulation follows ``global_batch`` (:mod:`ebft.app.strategies`)."""
    run = settings.run
    kwargs = dict(run.trainer.kwargs)
    kwargs["strategy"] = build_strategy(kwargs.get("strategy", "auto"))
    if kwargs.get("precision") is None:
        gpu = kwargs.get("accelerator") in ("gpu", "cuda") or (
            kwargs.get("accelerator") == "auto" and torch.cuda.is_available())
        kwargs["precision"] = "bf16-mixed" if gpu else "32-true"
    every = int(run.trainer.checkpoint_every_n_steps or kwargs.get("val_check_interval") or 0) or None
    ckpt = ModelCheckpoint(dirpath=str(output_dir / "checkpoints"), save_last=True, save_top_k=0,
                           every_n_train_steps=every)
    trainer = L.Trainer(default_root_dir=str(output_dir), logger=build_logger(run.logger, output_dir),
                        callbacks=[ckpt, MemoryEstimate(), *callbacks], plugins=[AtomicCheckpointIO()],
                        use_distributed_sampler=False, **kwargs)
    apply_global_batch(trainer, run.trainer, settings.optim.batch_size)
    check_launch(trainer)
    return trainer
