"""Build datamodule + method + Trainer from a composed config, then train.

``train.py`` is a thin Hydra wrapper around :func:`train`. Order matters for
errors: the config is validated and the data loaded before any model, so a
wrong key or a missing dataset fails in seconds.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from ebft.card import FINAL_METRICS, push, write_card
from ebft.config import validate
from ebft.data.sources import check_data_record
from ebft.eval.callback import CalibrationCallback
from ebft.eval.sandbox import require_isolation
from ebft.models.loading import HF_SUBDIR, load_tokenizer
from ebft.strategies import MemoryEstimate, apply_global_batch, build_strategy, check_launch

log = logging.getLogger(__name__)

# The training sampler resumes by itself (ResumableBatchSampler starts at the restored step), and the
# frozen feature network is in eval mode on purpose: Lightning's generic warnings about both mislead.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
# The CSV logger warns that a non-empty log folder will be cleared when fit starts after the initial
# validation wrote to it; it appends instead (metrics.csv keeps the step-0 validation).
warnings.filterwarnings("ignore", message=".*exists and is not empty. Previous log files.*")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: a crash never leaves a torn file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


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


def build_logger(cfg: DictConfig, output_dir: Path):
    kind = cfg.logger.kind
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger
        return CSVLogger(save_dir=str(output_dir), name="", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        return TensorBoardLogger(save_dir=str(output_dir), name="", version="")
    from lightning.pytorch.loggers import WandbLogger
    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.get("entity"),
                       offline=bool(cfg.logger.get("offline", False)), save_dir=str(output_dir))


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list[Callback]) -> L.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` (any Trainer keyword) plus our defaults; the
    strategy is built from its config and the accumulation follows ``global_batch`` (ebft.strategies)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs["strategy"] = build_strategy(kwargs.get("strategy", "auto"))
    if kwargs.get("precision") is None:
        gpu = kwargs.get("accelerator") in ("gpu", "cuda") or (
            kwargs.get("accelerator") == "auto" and torch.cuda.is_available())
        kwargs["precision"] = "bf16-mixed" if gpu else "32-true"
    every = int(cfg.get("checkpoint_every_n_steps") or kwargs.get("val_check_interval") or 0) or None
    ckpt = ModelCheckpoint(dirpath=str(output_dir / "checkpoints"), save_last=True, save_top_k=0,
                           every_n_train_steps=every)
    trainer = L.Trainer(default_root_dir=str(output_dir), logger=build_logger(cfg, output_dir),
                        callbacks=[ckpt, MemoryEstimate(), *callbacks], plugins=[AtomicCheckpointIO()],
                        use_distributed_sampler=False, **kwargs)
    apply_global_batch(trainer, cfg)
    check_launch(trainer)
    return trainer


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """A ``.ckpt`` file as is; a run directory -> its ``checkpoints/last.ckpt``."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    return str(path / "checkpoints" / "last.ckpt") if path.is_dir() else str(path)


def train(cfg: DictConfig) -> dict:
    """Validate, load data, build the method's module, fit, save the HF model, summarise."""
    validate(cfg)
    if cfg.get("init_from"):
        check_data_record(str(cfg.init_from), cfg, "init_from")
    if str(cfg.task.eval_suite) == "code":  # RLVR rewards and in-training benchmarks run generated code
        require_isolation(bool(cfg.eval.get("require_isolation", False)))
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    tokenizer = load_tokenizer(str(cfg.model.name))
    module_cls = get_class(str(cfg.method.module))
    datamodule = module_cls.make_datamodule(cfg, tokenizer)
    datamodule.setup("fit")
    module = module_cls(cfg, tokenizer, datamodule=datamodule)
    history, timer = ValidationHistory(), StepTimer()
    trainer = build_trainer(cfg, output_dir, [history, timer, CalibrationCallback(cfg)])
    start = time.time()
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
    if ckpt_path is None and int(cfg.trainer.get("limit_val_batches") or 0) != 0:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    elapsed = time.time() - start
    summary = {"steps": trainer.global_step, "seconds": round(elapsed, 1), "seconds_per_step": timer.per_step(trainer),
               "val_ce": history.history, "output_dir": str(output_dir)}
    full_state = trainer.strategy.lightning_module_state_dict()  # every rank: gathers sharded weights
    if trainer.is_global_zero:
        summary["hf_model"] = str(module.save_hf(output_dir / HF_SUBDIR, full_state))
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k in FINAL_METRICS}
        final.update({"val/ce": history.history[-1][1]} if history.history else {})  # also the initial validation
        write_card(summary["hf_model"], cfg, final, trainer.global_step)
        if cfg.get("hub") and cfg.hub.get("push"):
            summary["hub"] = push(summary["hf_model"], str(cfg.hub.repo_id), bool(cfg.hub.get("private")))
        print_summary(summary, trainer)
    return summary


def print_summary(summary: dict, trainer: L.Trainer) -> None:
    lines = [f"steps: {summary['steps']}  time: {summary['seconds']:.0f} s"]
    if summary["seconds_per_step"] is not None:
        lines[0] += f"  ({summary['seconds_per_step']:.2f} s per optimizer step, validation excluded)"
    if summary["val_ce"]:
        (s0, ce0), (s1, ce1) = summary["val_ce"][0], summary["val_ce"][-1]
        lines.append(f"validation CE: {ce0:.4f} (step {s0})" + (f" -> {ce1:.4f} (step {s1})" if s1 != s0 else ""))
    lines.append(f"HF model: {summary['hf_model']} (model card README.md, config.yaml)")
    if summary.get("hub"):
        lines.append(f"pushed: {summary['hub']}")
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        lines.append(f"metrics: {trainer.logger.log_dir}")
    lines.append(f"checkpoints: {Path(summary['output_dir']) / 'checkpoints'}")
    print("\n== run summary ==\n" + "\n".join(lines), flush=True)
