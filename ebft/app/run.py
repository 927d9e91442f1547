"""The training recipe behind ``train.py``: typed settings in, a trained and saved model out.

Order matters for errors: the settings are checked and the data loaded before any model, so a wrong
key or a missing dataset fails in seconds. The pieces: run directories (:mod:`ebft.app.rundir`), the
Trainer and its logger (:mod:`ebft.app.trainer`), the callbacks (:mod:`ebft.app.callbacks`), the
model card (:mod:`ebft.app.card`). Only rank 0 holds the run directory's lock; a run that fails
leaves no half-written ``*.tmp`` files (and no directory when it had written nothing).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from hydra.utils import get_class
from lightning.pytorch.utilities import rank_zero_only

from ebft.app.callbacks import Interrupted, StepTimer, StopOnSignal, ValidationHistory
from ebft.app.card import FINAL_METRICS, push, write_card
from ebft.app.rundir import (LAST, METRICS_FILE, checkpoint_step, forget_rows_after, prepare_output_dir,
                             remove_stale_tmp, removed_if_empty)
from ebft.app.trainer import build_trainer, refuse_non_finite, tensor_bytes
from ebft.config import ConfigError, TrainSettings
from ebft.data.sources import check_data_record
from ebft.eval.callback import CalibrationCallback
from ebft.execution.sandbox import require_isolation
from ebft.files import directory_lock, disk_full_names
from ebft.models import lora as lora_module
from ebft.models.loading import HF_SUBDIR, ModelSourceError, load_tokenizer, resolve_source
from ebft.models.quantization import check_quantization

log = logging.getLogger(__name__)


def validate(settings: TrainSettings) -> None:
    """The checks of the settings (:func:`ebft.config.train_settings`) that read files: model sources,
    ``init_from`` and ``ckpt_path``, LoRA's target modules against the model's config (no weights
    loaded) and a LoRA warm start's adapter, and that bitsandbytes can run ``model.quantization`` on the
    training device. Raises :class:`ConfigError`."""
    model, ckpt_path = settings.model, settings.run.ckpt_path
    for key, value in (("model.name", model.name), ("feature_network.name", settings.feature_network.name)):
        if value:
            try:
                resolve_source(str(value))
            except ModelSourceError as err:
                raise ConfigError(f"{key}: {err}") from None
    if model.init_from and not Path(model.init_from).exists():
        raise ConfigError(f"init_from={model.init_from} does not exist; give an SFT run dir (with hf_model/) or an HF dir")
    if ckpt_path and ckpt_path != "last" and not Path(ckpt_path).exists():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist; give a .ckpt file, a run dir with "
                          "checkpoints/last.ckpt, or 'last' (this run dir's, with hydra.run.dir=<run dir>)")
    check_quantization(model.quantization, settings.device)
    if model.lora is not None:
        targets = lora_module.target_modules(model.name, model.lora)
        warm = lora_module.adapter_dir(model.init_from)
        if warm is not None:
            lora_module.check_warm_adapter(warm, model.lora, targets)


def train(settings: TrainSettings) -> dict:
    """Validate, load data, build the method's module, fit, save the HF model, summarise."""
    output_dir = Path(settings.run.output_dir)
    with removed_if_empty(output_dir):
        validate(settings)
        if settings.model.init_from:
            check_data_record(settings.model.init_from, settings.data, "init_from")
        if settings.task.eval_suite == "code":  # RLVR rewards and in-training benchmarks run generated code
            require_isolation(settings.eval.benchmarks.require_isolation)
        # rank 0 holds the run directory; the other ranks of a multi-process run share it
        with directory_lock(output_dir, "training run") if rank_zero_only.rank == 0 else nullcontext():
            output_dir, ckpt_path = prepare_output_dir(settings.run, settings.method.name, settings.model.name,
                                                       settings.model.quantization)
            try:
                return _fit(settings, output_dir, ckpt_path)
            except BaseException:
                remove_stale_tmp(output_dir)
                raise


def _fit(settings: TrainSettings, output_dir: Path, ckpt_path: Path | None) -> dict:
    run = settings.run
    L.seed_everything(settings.seed, workers=True)
    tokenizer = load_tokenizer(settings.model.name)
    module_cls = get_class(run.module)
    datamodule = module_cls.make_datamodule(settings, tokenizer)
    datamodule.setup("fit")
    module_cls.check_data(settings, datamodule)
    module = module_cls(settings, tokenizer)
    history, timer = ValidationHistory(), StepTimer()
    last, stop = output_dir / LAST, StopOnSignal()
    if ckpt_path is not None and ckpt_path.resolve().parent.parent == output_dir.resolve():
        forget_rows_after(output_dir / METRICS_FILE, checkpoint_step(ckpt_path))
    trainer = build_trainer(settings, output_dir, [history, timer, CalibrationCallback(settings), stop])
    start = time.time()
    if ckpt_path is None and int(run.trainer.kwargs.get("limit_val_batches") or 0) != 0:
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
        write_card(summary["hf_model"], settings, final, trainer.global_step)
        if run.hub.push:
            summary["hub"] = push(summary["hf_model"], str(run.hub.repo_id), run.hub.private)
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
