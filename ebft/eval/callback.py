"""Calibration (and optionally a quick downstream check) during training.

Every ``eval.every_n_steps`` optimizer steps (and once before the first step) the callback logs

- ``val/cfm`` and ``val/cfm_whitened`` (with ``_se``): the CFM estimate and the proxy of paper eq. 53
  on a fixed random subset of ``eval.cfm_chunks`` held-out chunks (the same subset and sampler seed
  every time, so the curve moves with the model only);
- ``train/cfm_fixed`` (with ``_se``): the same CFM on the first ``eval.cfm_train_chunks`` training
  chunks of the run (those of its first optimizer steps): in-sample text the model has been trained
  on. A method that lowers this but not ``val/cfm`` is memorising;
- ``val/cfm_change`` and ``train/cfm_fixed_change`` (with ``_se``): the change since the run's first
  evaluation, paired over the same contexts and random numbers (:mod:`ebft.eval.paired`), whose
  standard error is far below that of either value;
- with ``eval.downstream_limit > 0``: the task's default benchmark on its first that many problems
  (``val/HumanEval/greedy``, ``val/HumanEval/pass@1``, ``val/BLEU/best-of-4``, ...).

The CFM values score the contexts of ``eval.anchors`` (in ``train.py``: EBFT's ``method.anchors``, so an
answer-anchored run follows the CFM of its answer blocks) and attend within examples with
``data.document_mask``; a set with fewer than two contexts to score is left out with a warning.

It runs the functions ``evaluate.py`` runs (:func:`ebft.eval.runner.calibrate`,
:func:`ebft.eval.runner.run_downstream`). The feature network is the EBFT module's own when it has one
(``pl_module.feature_network``), else the one ``evaluate.py`` builds from the same spec (``feature_network``,
:func:`ebft.models.features.build_feature_network`), built once: with LoRA over the base model the
generator's own layers with the adapters disabled (no copy; with ``model.quantization=4bit`` the 4-bit
base), else loaded. Training is left exactly as it was: every RNG (torch CPU and CUDA, Python ``random``, NumPy) is restored afterwards, and so is
the generator's train/eval mode. Validation CE is logged by the module itself (``val/ce``).

Under ``trainer=fsdp`` the callback switches itself off with a warning: it calls the generator
outside the strategy's forward, where FSDP keeps the root module's weights sharded.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

from ebft.config import ConfigError, TrainSettings
from ebft.core.layout import StridedLayout
from ebft.eval.paired import paired_difference
from ebft.eval.runner import (CALIBRATION, calibrate, held_out, load_benchmarks, plan_metrics, run_downstream,
                              scored_contexts, subset)
from ebft.models.features import FeatureNetwork, build_feature_network
from ebft.models.loading import resolve_dtype

log = logging.getLogger(__name__)


@contextmanager
def preserved_state(model: torch.nn.Module):
    """Restore every RNG state and ``model``'s train/eval mode on exit."""
    states = (torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
              random.getstate(), np.random.get_state())
    was_training = model.training
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])
        random.setstate(states[2])
        np.random.set_state(states[3])
        model.train(was_training)


class CalibrationCallback(Callback):
    """Logs held-out CFM (and optionally downstream scores) every ``eval.every_n_steps`` steps."""

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        schedule = settings.in_training
        self.every, self.limit, self.sampling = schedule.every_n_steps, schedule.downstream_limit, schedule.sampling
        self.downstream_metrics = ([m for m in plan_metrics(settings.task, settings.eval.benchmarks)
                                    if m not in CALIBRATION] if self.limit else [])
        self.train_chunks = schedule.cfm_train_chunks
        self.feature_network = None
        self.sets = {}
        self.initial: dict[str, list] = {}
        self.benchmarks = []
        self._last_step = -1

    def _setup(self, trainer, pl_module) -> None:
        """Feature network, fixed chunk subset and benchmarks, once, on the module's device."""
        s = self.settings
        feature_network = getattr(pl_module, "feature_network", None)
        if not isinstance(feature_network, FeatureNetwork):
            device, model = pl_module.device.type, s.model
            base = getattr(pl_module, "base_adapters", None)   # LoRA over the base: its own layers, adapters off
            feature_network = build_feature_network(s.feature_network, model.name, resolve_dtype(model.dtype, device),
                                                    device, model.attn_implementation,
                                                    generator=pl_module.generator if base is not None else None,
                                                    adapters=base, quantization=model.quantization)
        self.feature_network = feature_network.to(pl_module.device)
        chunks, rows = (getattr(trainer.datamodule, key, None) for key in ("val_chunks", "val_rows"))
        if chunks is None:
            data = held_out(s.data, pl_module.tokenizer, s.task.seq_len)
            chunks, rows = data.chunks, data.rows
        sets = {"val/cfm": subset(chunks, s.eval.calibration.cfm_chunks, s.seed)}
        first_trained = getattr(trainer.datamodule, "first_trained", None)
        if self.train_chunks and first_trained is not None:       # chunk data (SFT, EBFT); RLVR trains on prompts
            sets["train/cfm_fixed"] = first_trained(self.train_chunks)
        self.sets = {name: chunks for name, chunks in sets.items() if self._scorable(name, chunks)}
        log.info("in-training CFM before the first optimizer step and every %d: %s (%d samples per context; "
                 "eval.cfm_chunks, eval.cfm_train_chunks)", self.every,
                 ", ".join(f"{name} on {len(chunks)} chunks" for name, chunks in self.sets.items()),
                 s.eval.calibration.cfm_num_samples)
        self.benchmarks = load_benchmarks(s.eval, s.data, self.downstream_metrics, self.limit, rows)

    def _scorable(self, name: str, chunks) -> bool:
        """Whether ``chunks`` have contexts to score under ``eval.anchors``; a set without is left out with a
        warning (training goes on)."""
        try:
            scored_contexts(chunks, StridedLayout(*self.settings.task.geometry, 2), self.settings.eval.calibration)
        except ConfigError as err:
            log.warning("%s is not logged: %s", name, err)
            return False
        return True

    def run(self, trainer, pl_module) -> dict[str, float]:
        """Compute and log the metrics at the current step; returns them."""
        if self.feature_network is None:
            self._setup(trainer, pl_module)
        model = pl_module.generator
        metrics = {}
        with preserved_state(model):
            for name, chunks in self.sets.items():
                metrics.update(self._calibration(name, model, chunks))
            if self.benchmarks:
                scores, _ = run_downstream(model, pl_module.tokenizer, self.benchmarks, self.sampling, progress=False)
                metrics.update({f"val/{family}/{m}": v for family, values in scores.items() for m, v in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self._last_step = trainer.global_step
        return metrics

    def _calibration(self, name: str, model, chunks) -> dict[str, float]:
        """CFM on one fixed set of chunks, and its paired change since the run's first evaluation."""
        scalars, _, units = calibrate(model, self.feature_network, chunks, self.settings.task,
                                      self.settings.eval.calibration, ("cfm",), progress=False,
                                      document_mask=self.settings.data.document_mask)
        out = {name: scalars["cfm"], f"{name}_se": scalars["cfm_se"]}
        if name == "val/cfm":
            out.update({"val/cfm_whitened": scalars["cfm_whitened"], "val/cfm_whitened_se": scalars["cfm_whitened_se"]})
        if name not in self.initial:
            self.initial[name] = units["cfm"]
        else:
            change = paired_difference(units["cfm"], self.initial[name], n_permutations=0)
            out.update({f"{name}_change": change.mean, f"{name}_change_se": change.se})
        return out

    def state_dict(self) -> dict:
        """The first evaluation's per-context values, so a resumed run reports changes against them."""
        return {"initial": self.initial}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = dict(state_dict.get("initial", {}))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.every and isinstance(trainer.strategy, FSDPStrategy):
            log.warning("eval.every_n_steps=%d is switched off under trainer=fsdp: the callback runs the generator "
                        "outside the sharded forward, where FSDP keeps the root weights sharded. Evaluate the "
                        "checkpoints with evaluate.py (validation CE is still logged), or set eval.every_n_steps=0 "
                        "to silence this.", self.every)
            self.every = 0
        if self.every and trainer.global_step == 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and step != self._last_step:
            self.run(trainer, pl_module)
