"""The reproduction's settings: ``experiment=repro_small`` composed with the driver's size flags.

Everything the driver runs is a ``train.py`` or ``evaluate.py`` command line; this module turns the
config section ``repro`` (and ``--quick``, ``--steps``, ... ) into the override lists those commands
share, and into the effective knobs of every variant (composed by Hydra, so the report states what
really ran).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ebft.config import compose_config

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "repro_small"
METHOD_LABELS = {"sft": "SFT", "ebft": "EBFT", "rlvr": "RLVR"}


class ReproError(RuntimeError):
    """A setting or an output of the reproduction that cannot work; the message says how to fix it."""


def override_value(value) -> str:
    """A Python value as a Hydra override value (``null``, ``[1,2]``, ``0.0001``)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def merge_overrides(*groups) -> list[str]:
    """Concatenate override lists; a key given again replaces its earlier value (last one wins)."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            key = str(item).split("=", 1)[0]
            merged.pop(key, None)
            merged[key] = str(item)
    return list(merged.values())


def val_interval(steps: int, wanted: int) -> int:
    """The largest validation interval <= ``wanted`` that divides ``steps`` (so the last step is validated)."""
    wanted = max(1, min(int(wanted), steps))
    return next(d for d in range(wanted, 0, -1) if steps % d == 0)


def format_lr(lr: float) -> str:
    """A learning rate for names and tables: 1e-4, 3e-5, 2.5e-5."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: a method with its ``train.py`` overrides and its effective knobs."""

    name: str
    method: str
    overrides: tuple[str, ...]
    knobs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        base = METHOD_LABELS.get(self.method, self.method.upper())
        if self.method == "ebft":
            whitened = ", whitened" if self.knobs.get("whitening", "none") != "none" else ""
            return f"{base} (α={self.knobs['alpha']:g}, γ={self.knobs['gamma']:g}{whitened})"
        return base


@dataclass(frozen=True)
class Settings:
    """What the driver runs and where (see ``conf/experiment/repro_small.yaml``, section ``repro``)."""

    out: Path
    quick: bool
    train_common: tuple[str, ...]   # train.py overrides of every run (after experiment=repro_small)
    eval_common: tuple[str, ...]    # evaluate.py overrides giving it the training data, model and geometry
    variants: dict[str, Variant]
    seeds: tuple[int, ...]
    first_seed_only: tuple[str, ...]   # variants run at the first seed only (ablations)
    lr: dict[str, float]
    steps: int
    val_interval: int
    sweep: dict
    evaluation: dict[str, dict]     # part (calibration, profile, downstream) -> its sizes
    mbpp_path: str | None
    base_ckpt: str
    sizes: dict
    parts: tuple[str, ...] = ("calibration", "profile")   # evaluation parts; + downstream with --downstream

    def path_arg(self, path: Path) -> str:
        """``path`` as the commands name it: relative to the repository when inside it, else absolute."""
        path = Path(path).resolve()
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    @property
    def benchmarks(self) -> list[str]:
        return ["humaneval", "mbpp"] if self.mbpp_path else ["humaneval"]


def _section(cfg: DictConfig, quick: bool, key: str) -> dict:
    """``repro.<key>`` with ``repro.quick.<key>`` merged over it in quick mode, as plain data."""
    node = cfg.repro[key]
    if quick and key in cfg.repro.quick:
        node = OmegaConf.merge(node, cfg.repro.quick[key])
    return OmegaConf.to_container(node, resolve=True)


def _eval_common(cfg: DictConfig, mbpp_path: str | None) -> list[str]:
    """evaluate.py overrides that make its held-out data, model and geometry those of training."""
    choices = cfg.hydra.runtime.choices
    groups = [f"{g}={choices[g]}" for g in ("task", "model", "data")]
    default = compose_config("evaluate", groups)
    wanted = {f"task.{k}": cfg.task[k] for k in ("seq_len", "context_len", "stride", "gen_len", "pooling")}
    wanted.update({"model.name": cfg.model.name, "data.val_size": cfg.data.val_size, "data.seed": cfg.data.seed,
                   "data.limit": cfg.data.get("limit")})
    differing = [f"{k}={override_value(v)}" for k, v in wanted.items() if OmegaConf.select(default, k) != v]
    paths = [f"data.mbpp_path={override_value(mbpp_path)}", f"eval.mbpp_path={override_value(mbpp_path)}"]
    return groups + differing + paths


def _variant(name: str, overrides: list[str], common: list[str]) -> Variant:
    cfg = compose_config("train", merge_overrides(common, overrides))
    m = cfg.method
    knobs = {"batch_size": int(m.batch_size), "schedule": str(m.schedule)}
    if m.name == "ebft":
        knobs.update(alpha=float(cfg.alpha), gamma=float(cfg.gamma), whitening=str(m.whitening),
                     num_samples=int(m.num_samples), temperature=float(m.temperature))
    elif m.name == "rlvr":
        knobs.update(num_samples=int(m.num_samples), max_new_tokens=int(m.max_new_tokens),
                     temperature=float(m.temperature), scale_rewards=str(m.scale_rewards))
    elif m.name == "sft":
        knobs.update(loss_on=str(m.loss_on))
    return Variant(name, str(m.name), tuple(overrides), knobs)


def _common(quick: bool, steps: int | None, overrides: list[str], mbpp_path: str | None) -> list[str]:
    """train.py overrides shared by every run: the experiment, the quick profile, the size flags."""
    common = [f"experiment={EXPERIMENT}"]
    if quick:
        common += list(compose_config("train", common).repro.quick.overrides)
    if steps is not None:
        if steps < 1:
            raise ReproError(f"--steps={steps} must be >= 1")
        common.append(f"trainer.max_steps={steps}")
    return merge_overrides(common, overrides, [f"data.mbpp_path={override_value(mbpp_path)}"])


def _sweep(cfg: DictConfig, quick: bool, variants: dict[str, Variant], steps: int) -> dict:
    sweep = _section(cfg, quick, "lr_sweep")
    sweep["steps"] = steps if sweep.get("steps") is None else int(sweep["steps"])
    unknown = [v for v in sweep["variants"] if v not in variants]
    if unknown:
        raise ReproError(f"repro.lr_sweep.variants {unknown} are not in repro.variants ({', '.join(variants)})")
    swept = [variants[v].method for v in sweep["variants"]]
    if len(set(swept)) != len(swept):
        raise ReproError(f"repro.lr_sweep.variants {sweep['variants']} sweep a method twice; the chosen lr is per "
                         "method, so list one variant per method")
    return sweep


def _evaluation(cfg: DictConfig, quick: bool, chunks: int | None, profile_chunks: int | None,
                limit: int | None) -> dict[str, dict]:
    evaluation = _section(cfg, quick, "eval")
    for part, key, value in (("calibration", "chunks", chunks), ("profile", "chunks", profile_chunks),
                             ("downstream", "limit", limit)):
        if value is not None:
            if value < 1:
                raise ReproError(f"{part} {key}={value} must be >= 1")
            evaluation[part][key] = int(value)
    return evaluation


def _sizes(cfg: DictConfig) -> dict:
    """The sizes the report states: model, geometry, batch, steps, held-out data."""
    t = cfg.task
    return {"model": str(cfg.model.name), "task": str(t.name), "seq_len": int(t.seq_len),
            "context_len": int(t.context_len), "stride": int(t.stride), "gen_len": int(t.gen_len),
            "blocks": (int(t.seq_len) - int(t.gen_len) - int(t.context_len)) // int(t.stride) + 1,
            "batch_size": int(cfg.method.batch_size), "steps": int(cfg.trainer.max_steps),
            "val_size": int(cfg.data.val_size), "data_limit": cfg.data.get("limit"),
            "in_training_cfm_chunks": int(cfg.eval.cfm_chunks),
            "in_training_train_chunks": int(cfg.eval.get("cfm_train_chunks") or 0),
            "val_interval": int(cfg.trainer.val_check_interval),
            "in_training_val_chunks": int(cfg.trainer.limit_val_batches) * int(cfg.method.batch_size)}


def load_settings(out: str | os.PathLike | None = None, quick: bool = False, steps: int | None = None,
                  seeds: list[int] | None = None, limit: int | None = None, chunks: int | None = None,
                  profile_chunks: int | None = None, mbpp: str | None = None,
                  overrides: list[str] | None = None, rlvr: bool = False, downstream: bool = False) -> Settings:
    """Compose ``experiment=repro_small`` (+ the quick profile and the size flags) into :class:`Settings`.

    ``mbpp`` defaults to ``$EBFT_MBPP``; without it MBPP is neither trained on nor evaluated. ``rlvr``
    adds the optional RLVR variant, ``downstream`` the benchmark evaluation.
    """
    mbpp_path = mbpp or os.environ.get("EBFT_MBPP") or None
    if mbpp_path and not Path(mbpp_path).is_file():
        raise ReproError(f"MBPP file {mbpp_path} does not exist: pass --mbpp <mbpp.jsonl> or unset EBFT_MBPP")
    mbpp_path = os.path.relpath(Path(mbpp_path).resolve(), ROOT) if mbpp_path else None   # commands run in ROOT
    common = _common(quick, steps, overrides or [], mbpp_path)
    cfg = compose_config("train", common)
    total = int(cfg.trainer.max_steps)
    if total < 1:
        raise ReproError(f"trainer.max_steps={total}: the reproduction counts its budget in steps; set --steps")

    repro = cfg.repro
    extra = OmegaConf.to_container(repro.quick.variant_overrides, resolve=True) if quick else {}
    chosen = OmegaConf.to_container(repro.variants, resolve=True)
    if rlvr:
        chosen.update(OmegaConf.to_container(repro.optional_variants, resolve=True))
    variants = {name: _variant(name, merge_overrides(list(ov), extra.get(name, [])), common)
                for name, ov in chosen.items()}
    first_seed_only = tuple(v for v in repro.get("first_seed_only", []) if v in variants)
    lr = {k: float(v) for k, v in OmegaConf.to_container(repro.lr, resolve=True).items()}
    missing = sorted({v.method for v in variants.values()} - set(lr))
    if missing:
        raise ReproError(f"repro.lr has no learning rate for method(s) {', '.join(missing)}")
    seed_list = tuple(int(s) for s in (seeds or (repro.quick.seeds if quick else repro.seeds)))
    if not seed_list:
        raise ReproError("no seeds: give --seeds 43,44 or set repro.seeds")
    default_out = ROOT / ("outputs/repro_small_quick" if quick else "results/repro_small")
    return Settings(out=Path(out).resolve() if out else default_out, quick=quick, train_common=tuple(common),
                    eval_common=tuple(_eval_common(cfg, mbpp_path)), variants=variants, seeds=seed_list,
                    first_seed_only=first_seed_only, lr=lr,
                    steps=total, val_interval=val_interval(total, int(cfg.trainer.val_check_interval)),
                    sweep=_sweep(cfg, quick, variants, total),
                    evaluation=_evaluation(cfg, quick, chunks, profile_chunks, limit),
                    mbpp_path=mbpp_path, base_ckpt=str(cfg.model.name), sizes=_sizes(cfg),
                    parts=("calibration", "profile", "downstream") if downstream else ("calibration", "profile"))
