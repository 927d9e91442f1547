"""Multi-device training: strategy objects from config, the global batch, a memory estimate.

- ``trainer.strategy`` is a Lightning strategy name (``auto``, ``ddp``) or a mapping with
  ``_target_`` (``conf/trainer/{ddp,fsdp,deepspeed_stage_2}.yaml``) that is instantiated here.
- ``global_batch`` (chunks, or prompts for RLVR, per optimizer step over all devices) fixes the
  gradient accumulation once the Trainer knows how many devices it runs on:
  ``accumulate = global_batch / (method.batch_size * devices * num_nodes)``.
- FSDP wraps every decoder layer and the frozen feature network's embeddings; :class:`DecoderLayerPolicy`
  finds the layer class in the model at wrap time, so one config serves Llama, Qwen2, SmolLM and the
  tiny test model.
- :class:`MemoryEstimate` prints what parameters, gradients, Adam states and bf16 weight copies
  take per device under the chosen strategy before training starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from ebft.config import ConfigError, TrainerSettings

GIB = 1024 ** 3


def build_strategy(spec: Any):
    """``trainer.strategy`` as Lightning takes it: a name as is, a ``_target_`` mapping instantiated."""
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ConfigError(f"trainer.strategy={dict(spec)} has no _target_; give a strategy name "
                              "(auto, ddp) or pick one of trainer=ddp, trainer=fsdp, trainer=deepspeed_stage_2")
        return instantiate(dict(spec))
    return spec


# ------------------------------------------------------------------------------------ batch size
def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``micro_batch * world_size * accumulate == global_batch``."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        hint = (f"choose a method.batch_size that divides {global_batch // world_size} (global_batch / devices)"
                if global_batch % world_size == 0 else f"use a global_batch that is a multiple of {world_size}")
        raise ConfigError(f"global_batch={global_batch} is not a multiple of method.batch_size={micro_batch} "
                          f"x {world_size} device(s) = {per_pass}: {hint}")
    return global_batch // per_pass


def apply_global_batch(trainer: L.Trainer, settings: TrainerSettings, micro_batch: int) -> None:
    """Set the Trainer's gradient accumulation from ``global_batch`` (when set) and keep
    ``trainer.val_check_interval`` counted in optimizer steps (Lightning counts micro-batches).

    The Trainer resolves the device count (``devices=auto``, Slurm, several nodes), so this runs on
    the constructed Trainer, before ``fit``.
    """
    global_batch = settings.global_batch
    if global_batch is not None:
        accumulate = settings.kwargs.get("accumulate_grad_batches", 1)
        if int(accumulate) != 1:
            raise ConfigError(f"global_batch={global_batch} and trainer.accumulate_grad_batches={accumulate} both "
                              "set the accumulation; keep global_batch and drop the other")
        trainer.accumulate_grad_batches = gradient_accumulation(global_batch, micro_batch, trainer.world_size)
    if isinstance(trainer.val_check_interval, int):
        trainer.val_check_interval *= trainer.accumulate_grad_batches


# ------------------------------------------------------------------------------------------ FSDP
def _hf_models(root: nn.Module) -> list[nn.Module]:
    """The Hugging Face models inside ``root`` (modules that declare ``_no_split_modules``)."""
    return [m for m in root.modules() if getattr(m, "_no_split_modules", None)]


def decoder_layer_classes(root: nn.Module) -> set[type[nn.Module]]:
    """Classes named in ``_no_split_modules`` of the Hugging Face models inside ``root``
    (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...), as found among its submodules."""
    names = {name for m in _hf_models(root) for name in m._no_split_modules}
    classes = {type(m) for m in root.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"trainer=fsdp found no decoder layer class in {type(root).__name__} "
                          "(no Hugging Face model with _no_split_modules inside); use trainer=ddp")
    return classes


class DecoderLayerPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap policy: one unit per decoder layer (the class read from the model at wrap
    time) and one per frozen module holding weights outside the layers (the feature network's
    embeddings). FSDP flattens a unit's weights into one tensor of one dtype, so the frozen bf16
    network must not share the root unit with the generator's fp32 weights; and a unit gathers its
    weights in its own forward, so the units are modules the models call (not the backbone, which
    the project calls through ``base_model``, past a wrapper)."""

    def __init__(self):
        super().__init__(())

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        self._module_classes = decoder_layer_classes(root_module)
        self._module_classes_str = str(self._module_classes)
        targets = super()._run_policy(root_module, ignored_modules, root_kwargs)
        in_layers = {id(m) for layer in targets for m in layer.modules()}
        for module in root_module.modules():
            if (id(module) not in in_layers and module not in ignored_modules
                    and next(module.parameters(recurse=False), None) is not None
                    and not any(p.requires_grad for p in module.parameters())):
                targets[module] = dict(root_kwargs)
        return targets


# -------------------------------------------------------------------------------- memory estimate
def estimate_memory(trainable: int, trainable_bytes: int, frozen_bytes: int, kind: str, world_size: int,
                    mixed: bool) -> dict[str, float]:
    """Bytes per device of the model state (activations excluded).

    ``trainable`` parameters of ``trainable_bytes`` each (4 = fp32 master weights) have a gradient of
    the same size and two Adam moments; under mixed precision a 2-byte copy of the weights exists
    while they are used. ``kind``: ``replicated`` (single device, DDP: everything on every device),
    ``zero2`` (DeepSpeed stage 2: the bf16 model replicated; fp32 master weights, bf16 gradients
    and Adam states partitioned), ``full_shard`` (FSDP: everything partitioned, frozen weights too) or
    ``grad_op`` (FSDP SHARD_GRAD_OP: weights replicated, gradients and Adam partitioned).
    """
    n, w = world_size, trainable_bytes
    if kind == "replicated":
        parts = {"weights": trainable * w, "gradients": trainable * w, "adam": 2 * trainable * w,
                 "bf16 copies": 2 * trainable if mixed else 0, "frozen": frozen_bytes}
    elif kind == "zero2":
        parts = {"weights": trainable * w / n, "gradients": 2 * trainable / n,
                 "adam": 2 * trainable * w / n, "bf16 copies": 2 * trainable, "frozen": frozen_bytes}
    elif kind == "full_shard":
        parts = {"weights": trainable * w / n, "gradients": trainable * w / n, "adam": 2 * trainable * w / n,
                 "bf16 copies": 2 * trainable / n if mixed else 0, "frozen": frozen_bytes / n}
    elif kind == "grad_op":
        parts = {"weights": trainable * w, "gradients": trainable * w / n, "adam": 2 * trainable * w / n,
                 "bf16 copies": 2 * trainable if mixed else 0, "frozen": frozen_bytes}
    else:
        raise ValueError(f"unknown memory layout {kind!r}")
    parts["total"] = sum(parts.values())
    return parts


def strategy_layout(strategy) -> str:
    """The :func:`estimate_memory` layout of a Lightning strategy."""
    if isinstance(strategy, DeepSpeedStrategy):
        stage = int(strategy.config["zero_optimization"]["stage"])
        return "full_shard" if stage == 3 else "zero2" if stage == 2 else "replicated"
    if isinstance(strategy, FSDPStrategy):
        sharding = str(getattr(strategy.sharding_strategy, "name", strategy.sharding_strategy))
        return "grad_op" if sharding == "SHARD_GRAD_OP" else "replicated" if sharding == "NO_SHARD" \
            else "full_shard"
    return "replicated"


def _unique_parameters(module: nn.Module):
    seen: set[int] = set()
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            yield p


class MemoryEstimate(Callback):
    """Prints the per-device model-state memory of the run (rank 0) when training starts."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        params = list(_unique_parameters(pl_module))
        trainable = [p for p in params if p.requires_grad]
        count = sum(p.numel() for p in trainable)
        width = max((p.element_size() for p in trainable), default=4)
        frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
        precision = str(trainer.precision)
        layout = strategy_layout(trainer.strategy)
        parts = estimate_memory(count, width, frozen, layout, trainer.world_size, precision.endswith("mixed"))
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if k != "total")
        print(f"memory estimate per device ({type(trainer.strategy).__name__}, {layout}, {trainer.world_size} "
              f"device(s), {precision}): {count / 1e6:.1f}M trainable params; {detail} -> "
              f"{parts['total'] / GIB:.2f} GiB + activations", flush=True)


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a multi-process launch from inside a local Hydra multirun: Lightning would re-run the
    whole command line (the sweep included) in every child process."""
    launcher = getattr(trainer.strategy, "launcher", None)
    spawns = (isinstance(launcher, _SubprocessScriptLauncher)
              and not launcher.cluster_environment.creates_processes_externally)
    if spawns and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(f"trainer.devices={trainer.num_devices} starts one process per device, which a local "
                          "multirun (-m) cannot do; run the sweep with hydra/launcher=slurm (one task per GPU), "
                          "or run each configuration without -m")
