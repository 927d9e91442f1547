"""LoRA fine-tuning (``model.lora``) with the ``peft`` library, for every method.

With ``model.lora.rank`` = r set, every target linear layer ``y = W x`` of the generator becomes

    y = W x + (alpha / r) * B A dropout(x),   A (r x d_in), B (d_out x r), B = 0 at the start,

W stays frozen in ``model.dtype`` and only A and B (fp32) are trained, so the optimizer holds only
their state. The frozen base costs nothing extra: the generator with its adapters disabled IS the
base model. EBFT's feature network phi (paper §2, eqs. 2-4: a frozen copy of the base model) is
therefore the generator's own first layers run under ``disable_adapter()`` (``FeatureNetwork(...,
adapters=...)``), and RLVR's KL reference (the initial policy) is the generator with its adapters
disabled; neither needs a second copy of the weights.

Run outputs: ``adapter/`` (``peft``'s ``save_pretrained``: A, B and their config, loadable with
``PeftModel.from_pretrained(base, run/adapter)``) and ``hf_model/`` with the adapters folded into the
weights, ``W + (alpha / r) B A``, which ``evaluate.py`` and any HF tool load. Lightning checkpoints
keep only the trainable weights (the adapters) and the optimizer state; the base weights are loaded
again from their source on resume.

With ``model.quantization=4bit`` (QLoRA, ``ebft.models.quantization``) W is the frozen 4-bit NF4 base
``W_hat``: everything above holds with W = W_hat (the feature network and the KL reference are the
quantised base), and ``hf_model/`` holds ``W_hat`` dequantised to ``model.dtype`` plus the merged
adapters, a plain model.

A warm start from a LoRA run (``init_from=<run with adapter/>``) with LoRA on keeps the base model
under the adapters and continues training the run's adapter.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ebft.config import ConfigError, LoraSettings
from ebft.models.loading import load_config
from ebft.models.quantization import dequantized_weight, quantized_linears

ADAPTER_SUBDIR = "adapter"
_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The attention and MLP projections of each model family (``config.model_type``).
FAMILY_TARGETS = {family: _PROJECTIONS for family in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")}


def adapter_dir(path) -> Path | None:
    """``<path>/adapter`` when ``path`` is a LoRA run directory (or an adapter directory itself), else None."""
    if not path:
        return None
    for candidate in (Path(str(path)) / ADAPTER_SUBDIR, Path(str(path))):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def linear_names(model: nn.Module) -> list[str]:
    """The distinct names of the model's linear layers (what ``target_modules`` can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def target_modules(name: str, lora: LoraSettings) -> list[str]:
    """The layers that get adapters: ``model.lora.target_modules`` or the family's attention and MLP
    projections. Read from ``name``'s config on the meta device (no weights are loaded); a name that
    matches no module raises :class:`ConfigError` listing the model's linear layers."""
    from transformers import AutoModelForCausalLM

    config = load_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = ", ".join(linear_names(model))
    targets = lora.target_modules
    if targets is None:
        if config.model_type not in FAMILY_TARGETS:
            raise ConfigError(f"model.lora.target_modules=null has no default for model type {config.model_type!r}; "
                              f"name the layers, e.g. model.lora.target_modules=[...] from its linear layers: {linear}")
        return list(FAMILY_TARGETS[config.model_type])
    targets = [str(t) for t in targets]
    modules = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise ConfigError(f"model.lora.target_modules: {missing} match no module of {type(model).__name__} ({name}); "
                          f"its linear layers are named: {linear}")
    return targets


def lora_config(lora: LoraSettings, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=float(lora.dropout),
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def check_warm_adapter(directory: Path, lora: LoraSettings, targets: list[str]) -> None:
    """A LoRA warm start continues the run's adapter: its rank, alpha and targets must be ``model.lora``'s."""
    from peft import LoraConfig

    saved = LoraConfig.from_pretrained(str(directory))
    want = {"rank": lora.rank, "lora_alpha": lora.scale_alpha, "target_modules": sorted(targets)}
    have = {"rank": int(saved.r), "lora_alpha": float(saved.lora_alpha), "target_modules": sorted(saved.target_modules)}
    if want != have:
        diff = ", ".join(f"model.lora.{k}={want[k]} but the adapter has {have[k]}" for k in want if want[k] != have[k])
        raise ConfigError(f"init_from={directory.parent}: {diff}; set model.lora to the adapter's settings "
                          "to continue it")


def add_adapters(model: nn.Module, lora: LoraSettings, targets: list[str], init_from: str | None = None):
    """Wrap ``model`` (its layers are changed in place) in a ``peft`` model with trainable adapters on
    ``targets`` (:func:`target_modules`): the warm start's adapter when ``init_from`` is a LoRA run,
    else new ones (B = 0). Every other weight is frozen."""
    from peft import PeftModel, get_peft_model

    warm = adapter_dir(init_from)
    if warm is not None:
        check_warm_adapter(warm, lora, targets)
        return PeftModel.from_pretrained(model, str(warm), is_trainable=True)
    return get_peft_model(model, lora_config(lora, targets))


@contextmanager
def adapters_disabled(peft_model):
    """The frozen base model: adapters off, eval mode (no dropout), no autograd graph; all restored on exit."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), torch.no_grad():
            yield
    finally:
        peft_model.train(was_training)


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own names with every adapter folded in,
    ``W + (alpha / r) B A`` (in W's dtype); a 4-bit layer's W is its dequantised ``W_hat`` (in the dtype
    it was quantised from), its quantisation state is dropped: a plain model's state dict. The live
    model is not changed."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas = {f"{name}.weight": module.get_delta_weight(module.active_adapters[0])
              for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    dense = {f"{name}.weight".replace(".base_layer.", "."): dequantized_weight(module)
             for name, module in quantized_linears(base).items()}
    quant_state = tuple(f"{key}." for key in dense)   # <weight>.absmax, .quant_map, ... of a 4-bit weight
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        if key.startswith(quant_state):
            continue
        value = dense.get(key, value)
        state[key] = (value.float() + deltas[key].float()).to(value.dtype) if key in deltas else value
    return state


def frozen_adapter(model: nn.Module, directory: Path) -> nn.Module:
    """``model`` (its layers changed in place) running the saved adapter of ``directory`` (a run's
    ``adapter/``), every weight frozen, eval mode: a fixed policy without merging the adapter into the
    base weights (which a 4-bit base cannot hold)."""
    from peft import PeftModel

    PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    return model.eval().requires_grad_(False)


def trainable_state(module: nn.Module, state: dict) -> dict:
    """The entries of ``module``'s ``state`` (its state dict) that are trainable parameters."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def complete_state(module: nn.Module, state: dict) -> None:
    """Fill a checkpoint's ``state`` (trainable weights only) with ``module``'s frozen weights, in place;
    raise when a trainable weight is missing (the checkpoint is not from this LoRA setting). A 4-bit
    weight's quantisation state (``<weight>.absmax``, ...: extra entries of its state dict, which
    ``load_state_dict`` does not take back) is left out: the live quantised base stays as it is."""
    own = module.state_dict()
    missing = [k for k in trainable_state(module, own) if k not in state]
    if missing:
        raise ConfigError(f"the checkpoint has no weights for {len(missing)} adapter parameter(s) (e.g. {missing[0]}); "
                          "resume with the model.lora settings of the run that wrote it")
    loadable = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    loadable |= {name for name, _ in module.named_buffers(remove_duplicate=False)}
    for key, value in own.items():
        if key in loadable:
            state.setdefault(key, value)
