"""Validation of the composed config: one clear error per mistake, before any
model or dataset is loaded. Each message names the key, the bad value and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

SCHEDULES = ("constant", "cosine")
LOSS_ON = ("answer", "all")
WHITENING = ("none", "reference", "paper")
POOLING = ("last_token", "mean", "mean_raw")
NORMALISATION = ("joint", "per_layer")
REDUCTIONS = ("token_mean", "sequence_sum")
LOGGERS = ("csv", "tensorboard", "wandb")


def compose_config(config_name: str, overrides) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` outside a Hydra app (scripts, drivers),
    with the Hydra node so that group choices can be read."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and how to fix it."""


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the key and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    _require(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}")


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node


def validate_geometry(task: DictConfig) -> None:
    """T, C, s, G must give at least one block: NB = floor((T - G - C)/s) + 1 >= 1."""
    T, C, s, G = (int(task[k]) for k in ("seq_len", "context_len", "stride", "gen_len"))
    _require(C >= 1, f"task.context_len={C} must be >= 1 (every context needs a token)")
    _require(s >= 1, f"task.stride={s} must be >= 1")
    _require(G >= 1, f"task.gen_len={G} must be >= 1")
    _require(T >= C + G, f"task.seq_len={T} is too small for context_len={C} + gen_len={G}: "
                         f"raise task.seq_len to at least {C + G} or shorten the geometry")


def validate_optim(method: DictConfig) -> None:
    _require(float(method.lr) > 0, f"method.lr={method.lr} must be > 0")
    _require(int(method.batch_size) >= 1, f"method.batch_size={method.batch_size} must be >= 1")
    _require(0 <= float(method.warmup_ratio) < 1, f"method.warmup_ratio={method.warmup_ratio} must be in [0, 1)")
    _require(len(method.betas) == 2 and all(0 <= float(b) < 1 for b in method.betas),
             f"method.betas={list(method.betas)} must be two numbers in [0, 1)")
    _require(method.schedule in SCHEDULES,
             f"method.schedule={method.schedule!r} is not one of {', '.join(SCHEDULES)}")


def validate_top_p(method: DictConfig) -> None:
    """Training samples with ``method.top_p = 1``: the update scores every sampled token under the
    full ``softmax(logits / temperature)`` (the log-probs of paper eq. 7; the PPO ratio of RLVR), so
    tokens drawn from a top-p nucleus would be scored under another distribution than the one they
    were drawn from (off-policy). Refused rather than silently biased."""
    _require(float(method.top_p) == 1,
             f"method.top_p={method.top_p}: training scores each sampled token under the full distribution "
             "softmax(logits / temperature) (paper eq. 7), so nucleus sampling (top_p < 1) would make the update "
             "off-policy; use method.top_p=1.0 (the paper's setting). Evaluation's nucleus is eval.top_p")


def validate_ebft(cfg: DictConfig) -> None:
    m = cfg.method
    alpha, n = float(cfg.alpha), int(m.num_samples)
    _require(0 <= alpha <= 1, f"alpha={alpha} must be in [0, 1] (paper App. C); use alpha=1 for the proper scoring rule")
    _require(float(cfg.gamma) >= 0, f"gamma={cfg.gamma} must be >= 0 (weight of the CE term)")
    _require(n >= 1, f"method.num_samples={n} must be >= 1")
    _require(not (n == 1 and alpha > 0),
             f"method.num_samples=1 with alpha={alpha}: the diversity term needs n >= 2 samples; "
             "set method.num_samples>=2 or alpha=0")
    _require(float(m.temperature) > 0, f"method.temperature={m.temperature} must be > 0")
    validate_top_p(m)
    _choice(cfg, "method.whitening", WHITENING)
    _choice(cfg, "method.loss_reduction", REDUCTIONS)
    _choice(cfg, "method.ce_on", LOSS_ON)
    _choice(cfg, "method.features.pooling", POOLING)
    _choice(cfg, "method.features.normalisation", NORMALISATION)
    layers = list(m.features.layers)
    _require(len(layers) >= 1 and all(0 < float(q) <= 1 for q in layers),
             f"method.features.layers={layers} must be depth fractions in (0, 1], e.g. [0.25,0.5,0.75]")
    if alpha < 1:
        log.warning("alpha=%s < 1: the feature-matching objective is then not a proper scoring rule "
                    "(paper App. C); alpha=1 is the calibrated choice", alpha)


def validate_rlvr(cfg: DictConfig) -> None:
    _require(bool(cfg.task.get("verifiable", False)),
             f"method=rlvr needs a verifiable reward, and task={cfg.task.name} has no verifier "
             "(no unit tests or references to score against); use method=ebft for this task")
    m = cfg.method
    _require(int(m.num_samples) >= 2, f"method.num_samples={m.num_samples}: GRPO needs >= 2 samples per prompt")
    _require(float(m.temperature) > 0, f"method.temperature={m.temperature} must be > 0")
    validate_top_p(m)
    _require(int(m.max_new_tokens) >= 1, f"method.max_new_tokens={m.max_new_tokens} must be >= 1")
    _choice(cfg, "method.scale_rewards", ("none", "group", "batch"))


NUMBERS = {"alpha": float, "gamma": float, "seed": int, "global_batch": int, "method.lr": float,
           "method.batch_size": int, "method.warmup_ratio": float, "method.weight_decay": float,
           "method.num_samples": int, "method.temperature": float, "method.top_p": float,
           "method.max_new_tokens": int, "task.seq_len": int, "task.context_len": int, "task.stride": int,
           "task.gen_len": int, "trainer.max_steps": int}


def validate_numbers(cfg: DictConfig) -> None:
    """Every numeric key that is set holds a number (``alpha=abc`` names ``alpha``)."""
    for key, kind in NUMBERS.items():
        value = _get(cfg, key)
        if value is None:
            continue
        try:
            if isinstance(value, bool) or kind(value) != float(value):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


def validate_values(cfg: DictConfig) -> None:
    """Check the values of the training config that need no file or model (the paths and LoRA's
    target modules are checked by ``ebft.run.validate``); raise :class:`ConfigError` on the first problem."""
    validate_numbers(cfg)
    validate_geometry(cfg.task)
    validate_optim(cfg.method)
    _choice(cfg, "logger.kind", LOGGERS)
    name = str(cfg.method.name)
    if name == "sft":
        _choice(cfg, "method.loss_on", LOSS_ON)
    elif name == "ebft":
        validate_ebft(cfg)
    elif name == "rlvr":
        validate_rlvr(cfg)
    if cfg.get("hub") and cfg.hub.get("push"):
        _require(str(cfg.hub.get("repo_id") or "").count("/") == 1,
                 f"hub.push=true needs hub.repo_id=<owner/name>, got {cfg.hub.get('repo_id')!r}")
