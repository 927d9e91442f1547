"""Calibration (and optionally a quick downstream check) during training.

Every ``eval.every_n_steps`` optimizer steps (and once before the first step) the callback logs

- ``val/cfm`` and ``val/cfm_whitened`` (with ``_se``): the CFM estimate and the proxy of paper eq. 53
  on a fixed random subset of ``eval.cfm_chunks`` held-out chunks (the same subset and sampler seed
  every time, so the curve moves with the model only);
- with ``eval.downstream_limit > 0``: the task's default benchmark on its first that many problems
  (``val/HumanEval/greedy``, ``val/HumanEval/pass@1``, ``val/BLEU/best-of-4``, ...).

It runs the functions ``evaluate.py`` runs (:func:`ebft.eval.runner.calibrate`,
:func:`ebft.eval.runner.run_downstream`). The critic is the EBFT module's own feature network when
it has one (``pl_module.features``), else the base model's, built once. Training is left exactly as
it was: every RNG (torch CPU and CUDA, Python ``random``, NumPy) is restored afterwards, and so is
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
from omegaconf import DictConfig

from ebft.config import ConfigError
from ebft.eval.runner import (CALIBRATION, build_critic, calibrate, held_out, load_benchmarks, plan_metrics,
                              run_downstream, sampling_from, subset)
from ebft.models.features import FeatureNetwork

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


def schedule_of(cfg: DictConfig) -> int:
    """``eval.every_n_steps`` as a step count (0 = off)."""
    every = cfg.eval.get("every_n_steps") or 0
    if isinstance(every, float) and not every.is_integer() or int(every) < 0:
        raise ConfigError(f"eval.every_n_steps={every} must be a whole number of optimizer steps >= 0 (0 = off); "
                          "set it explicitly when trainer.val_check_interval is a fraction of an epoch")
    return int(every)


class CalibrationCallback(Callback):
    """Logs held-out CFM (and optionally downstream scores) every ``eval.every_n_steps`` steps."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.every = schedule_of(cfg)
        self.limit = int(cfg.eval.get("downstream_limit") or 0)
        self.sampling = sampling_from(cfg.eval, cfg, prefix="eval.") if self.limit else None
        self.downstream_metrics = [m for m in plan_metrics(cfg) if m not in CALIBRATION] if self.limit else []
        self.critic = self.chunks = None
        self.benchmarks = []
        self._last_step = -1

    def _setup(self, trainer, pl_module) -> None:
        """Critic, fixed chunk subset and benchmarks, once, on the module's device."""
        cfg = self.cfg
        features = getattr(pl_module, "features", None)
        critic = features if isinstance(features, FeatureNetwork) else build_critic(cfg, pl_module.device.type)
        self.critic = critic.to(pl_module.device)
        chunks, rows = (getattr(trainer.datamodule, key, None) for key in ("val_chunks", "val_rows"))
        if chunks is None:
            data = held_out(cfg, pl_module.tokenizer)
            chunks, rows = data.chunks, data.rows
        self.chunks = subset(chunks, cfg.eval.get("cfm_chunks"), int(cfg.seed))
        self.benchmarks = load_benchmarks(cfg, self.downstream_metrics, self.limit, rows)

    def run(self, trainer, pl_module) -> dict[str, float]:
        """Compute and log the metrics at the current step; returns them."""
        if self.critic is None:
            self._setup(trainer, pl_module)
        model = pl_module.generator
        with preserved_state(model):
            scalars, _, _ = calibrate(model, self.critic, self.chunks, self.cfg, ("cfm",), progress=False)
            metrics = {f"val/{k}": scalars[k] for k in ("cfm", "cfm_se", "cfm_whitened", "cfm_whitened_se")}
            if self.benchmarks:
                scores, _ = run_downstream(model, pl_module.tokenizer, self.benchmarks, self.sampling, progress=False)
                metrics.update({f"val/{family}/{m}": v for family, values in scores.items() for m, v in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self._last_step = trainer.global_step
        return metrics

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
