"""Build datamodule + method + Trainer from a composed config, then train.

``train.py`` is a thin Hydra wrapper around :func:`train`. Order matters for
errors: the config is validated and the data loaded before any model, so a
wrong key or a missing dataset fails in seconds.

A run never destroys earlier results: it refuses a directory that holds another
run unless it resumes that run in place (``ckpt_path=last`` or the directory
itself; ``metrics.csv`` is then appended to), a checkpoint is checked before
resuming (readable, same method and model), no checkpoint or HF model with
non-finite weights is written, SIGTERM / SIGINT save a checkpoint at the
current step and stop with :class:`Interrupted`, the last step always gets a
checkpoint, and a run that fails leaves no half-written ``*.tmp`` files (and
no directory when it had written nothing).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ebft.card import FINAL_METRICS, push, write_card
from ebft.config import ConfigError, TrainSettings, train_settings
from ebft.data.sources import check_data_record
from ebft.eval.callback import CalibrationCallback
from ebft.execution.sandbox import require_isolation
from ebft.models import lora as lora_module
from ebft.models.loading import HF_SUBDIR, ModelSourceError, load_tokenizer, resolve_source
from ebft.reporting import LOCK_FILE, DirectoryBusy, directory_lock, disk_full_names, write_csv
from ebft.strategies import MemoryEstimate, apply_global_batch, build_strategy, check_launch

log = logging.getLogger(__name__)

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with disk_full_names(path, tensor_bytes(checkpoint)):
            super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples: what saving it writes, roughly."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` (a run resumed in place) is appended to
    instead of deleted; its columns are kept."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r") as f:
                self.metrics_keys = sorted(f.readline().strip().split(","))


METRICS_FILE = "metrics.csv"


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


class AppendingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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


def build_logger(cfg: DictConfig, output_dir: Path):
    kind = cfg.logger.kind
    if kind == "csv":
        return AppendingCSVLogger(save_dir=str(output_dir), name="", version="")
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


LAST = Path("checkpoints") / "last.ckpt"


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


RUN_OUTPUTS = (METRICS_FILE, "checkpoints", HF_SUBDIR, "adapter")
"""What a training run writes into its directory; a directory holding one of them holds a run."""


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


def check_checkpoint(path: Path, cfg: DictConfig) -> None:
    """``path`` is a readable checkpoint of this method and model (read without loading the weights)."""
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
    for group in ("method", "model"):
        was, now = saved_cfg.get(group, {}).get("name"), str(cfg[group].name)
        if was is not None and was != now:
            raise ConfigError(f"ckpt_path: {path} is a checkpoint of {group}.name={was}, not {group}.name={now}: "
                              f"resume it with {group}={was if group == 'method' else '<its model config>'}, or "
                              "start a new run without ckpt_path")


def prepare_output_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from. A directory holding another run is refused
    unless this run resumes it in place; stale ``*.tmp`` files of a crashed run are removed."""
    output_dir = Path(cfg.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, cfg)
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


def remove_stale_tmp(output_dir: Path) -> None:
    """The temporary files of an atomic write a crash interrupted (``*.tmp``, ``hf_model.tmp/``)."""
    for tmp in [*output_dir.glob("*.tmp"), *output_dir.glob("checkpoints/*.tmp")]:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as a run records it (``hparams.yaml``, checkpoints, ``hf_model/config.yaml``):
    the run directory relative to the working directory when it lies inside it, so that a run's
    record names no path of the machine it ran on."""
    record = OmegaConf.to_container(cfg, resolve=True)
    out, cwd = Path(str(record.get("output_dir", ""))), Path.cwd()
    if out.is_absolute() and out.is_relative_to(cwd):
        record["output_dir"] = str(out.relative_to(cwd))
    return record


def validate(cfg: DictConfig) -> TrainSettings:
    """The training config as typed settings (:func:`ebft.config.train_settings`), then the checks that
    read files: model sources, ``init_from`` and ``ckpt_path``, and LoRA's target modules against the
    model's config (no weights loaded) and a LoRA warm start's adapter. Raises :class:`ConfigError`."""
    settings = replace(train_settings(cfg), record=recorded_config(cfg))
    model = settings.model
    for key, value in (("model.name", model.name), ("feature_network.name", settings.feature_network.name)):
        if value:
            try:
                resolve_source(str(value))
            except ModelSourceError as err:
                raise ConfigError(f"{key}: {err}") from None
    if model.init_from and not Path(model.init_from).exists():
        raise ConfigError(f"init_from={model.init_from} does not exist; give an SFT run dir (with hf_model/) or an HF dir")
    if cfg.get("ckpt_path") and str(cfg.ckpt_path) != "last" and not Path(str(cfg.ckpt_path)).exists():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give a .ckpt file, a run dir with "
                          "checkpoints/last.ckpt, or 'last' (this run dir's, with hydra.run.dir=<run dir>)")
    if model.lora is not None:
        targets = lora_module.target_modules(model.name, model.lora)
        warm = lora_module.adapter_dir(model.init_from)
        if warm is not None:
            lora_module.check_warm_adapter(warm, model.lora, targets)
    return settings


def train(cfg: DictConfig) -> dict:
    """Validate, load data, build the method's module, fit, save the HF model, summarise."""
    output_dir, ours = Path(cfg.output_dir), False
    try:
        settings = validate(cfg)
        if settings.model.init_from:
            check_data_record(settings.model.init_from, settings.data, "init_from")
        if settings.task.eval_suite == "code":  # RLVR rewards and in-training benchmarks run generated code
            require_isolation(settings.eval.benchmarks.require_isolation)
        # rank 0 holds the run directory; the other ranks of a multi-process run share it
        with directory_lock(output_dir, "training run") if rank_zero_only.rank == 0 else nullcontext():
            output_dir, ckpt_path = prepare_output_dir(cfg)
            ours = True
            return _fit(cfg, settings, output_dir, ckpt_path)
    except DirectoryBusy:
        raise
    except BaseException:
        if ours:
            remove_stale_tmp(output_dir)
        if not previous_results(output_dir):  # nothing worth keeping: no stray empty run directory
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _fit(cfg: DictConfig, settings: TrainSettings, output_dir: Path, ckpt_path: Path | None) -> dict:
    L.seed_everything(settings.seed, workers=True)
    tokenizer = load_tokenizer(settings.model.name)
    module_cls = get_class(str(cfg.method.module))
    datamodule = module_cls.make_datamodule(settings, tokenizer)
    datamodule.setup("fit")
    module = module_cls(settings, tokenizer)
    history, timer = ValidationHistory(), StepTimer()
    last, stop = output_dir / LAST, StopOnSignal()
    if ckpt_path is not None and ckpt_path.resolve().parent.parent == output_dir.resolve():
        forget_rows_after(output_dir / METRICS_FILE, checkpoint_step(ckpt_path))
    trainer = build_trainer(cfg, output_dir, [history, timer, CalibrationCallback(settings), stop])
    start = time.time()
    if ckpt_path is None and int(cfg.trainer.get("limit_val_batches") or 0) != 0:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    if getattr(trainer.checkpoint_callback, "_last_global_step_saved", None) != trainer.global_step:
        trainer.save_checkpoint(last)  # the last step always has a checkpoint
    if stop.stopped:
        raise Interrupted(stop.signum, trainer.global_step, last)
    elapsed = time.time() - start
    summary = {"steps": trainer.global_step, "seconds": round(elapsed, 1), "seconds_per_step": timer.per_step(trainer),
               "val_ce": history.history, "output_dir": str(output_dir)}
    full_state = trainer.strategy.lightning_module_state_dict()  # every rank: gathers sharded weights
    if trainer.is_global_zero:
        refuse_non_finite(full_state, f"the HF model {output_dir / HF_SUBDIR}")
        with disk_full_names(output_dir / HF_SUBDIR, tensor_bytes(full_state)):
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
    checkpoints = Path(summary["output_dir"]) / LAST.parent
    if checkpoints.is_dir():
        lines.append(f"checkpoints: {checkpoints}")
    print("\n== run summary ==\n" + "\n".join(lines), flush=True)
