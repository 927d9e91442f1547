"""QLoRA (``model.quantization=4bit``): the frozen base in 4-bit NF4 under LoRA adapters (``ebft.models.lora``).

What is quantised: every linear layer of the decoder (attention and MLP projections), by ``transformers``'
``bitsandbytes`` integration (``BitsAndBytesConfig``): each weight ``W`` is cut into blocks of 64 values,
a block is stored as 4-bit codes ``q`` into the 16 NF4 levels (quantiles of a normal distribution) and its
absmax ``m``, and the absmaxes themselves are quantised again to 8 bits (double quantisation), so

    W_hat = NF4[q] * m,      y = W_hat x   (W_hat materialised in the compute dtype)

about 4.1 bits per weight. The embeddings, norms and LM head stay in ``model.dtype``, which is also the
compute dtype (``auto``: bf16 on CUDA, fp32 on CPU). The LoRA adapters (fp32) are trained on top of
``W_hat``; nothing else changes. EBFT's feature network and RLVR's KL reference are this quantised base
with the adapters disabled, so phi is ``W_hat``'s network, not the full-precision base.

Every load goes through ``from_pretrained(..., quantization_config=...)`` on the device it trains on: a
random-weight model (``tiny``, ``tiny:<hub id>``, ``random:<hub id>``) is saved to a temporary directory
and loaded back the same way. Quantisation is a fixed function of the weights, so a resumed run gets
the same base bit for bit from the same source (checkpoints hold only the adapters).

The export (``hf_model/``) is a plain model: ``W_hat`` dequantised to the compute dtype plus the merged
adapters, ``W_hat + (alpha / r) B A``: the trained function up to the compute dtype's rounding, not the
original full-precision base plus the adapters.

``bitsandbytes`` must be installed and able to run on the training device (:func:`check_quantization`):
CUDA needs its CUDA library to load; CPU works with the pinned ``bitsandbytes >= 0.50`` (slowly: tests and
dry runs)."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Collection

import torch
from torch import nn

from ebft.config import QUANTIZATION, ConfigError

QUANT_TYPE = "nf4"
DOUBLE_QUANT = True


def bitsandbytes_backends() -> frozenset[str]:
    """The torch device types (``cpu``, ``cuda``, ...) on which the installed ``bitsandbytes`` runs 4-bit
    layers: its ``supported_torch_devices`` (older releases: CUDA only), without ``cuda`` when torch sees no
    GPU or bitsandbytes' CUDA library did not load. Raises :class:`ConfigError` when it is not installed."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("model.quantization=4bit needs the bitsandbytes library, which is not installed: "
                          "pip install bitsandbytes (or pip install -r requirements.txt)") from None
    devices = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if "cuda" in devices:
        from bitsandbytes import cextension

        mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", ())
        if not torch.cuda.is_available() or isinstance(getattr(cextension, "lib", None), mock):
            devices.discard("cuda")
    return frozenset(devices)


def check_quantization(quantization: str | None, device: str, backends: Collection[str] | None = None) -> None:
    """Refuse ``model.quantization`` that cannot run on ``device`` (a torch device type such as ``cuda`` or
    ``cpu``) with :class:`ConfigError`: an unknown value, bitsandbytes not installed, or bitsandbytes unable
    to run there. ``backends``: the device types it runs on (default: :func:`bitsandbytes_backends`)."""
    if quantization is None:
        return
    if quantization not in QUANTIZATION:
        raise ConfigError(f"model.quantization={quantization!r} is not one of null, {', '.join(QUANTIZATION)}")
    backends = bitsandbytes_backends() if backends is None else frozenset(backends)
    kind = torch.device(device).type
    if kind not in backends:
        version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
        raise ConfigError(
            f"model.quantization={quantization} on {kind}: the installed bitsandbytes {version} cannot run 4-bit "
            f"layers there (it runs on: {', '.join(sorted(backends)) or 'nothing here'}); install a build for this "
            "device (pip install -U bitsandbytes; python -m bitsandbytes says what it found), train on a device it "
            "supports, or set model.quantization=null")


def quantization_config(dtype: torch.dtype):
    """``transformers``' ``BitsAndBytesConfig`` of ``model.quantization=4bit``: NF4, double quantisation, compute
    in ``dtype`` (``model.dtype``)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=DOUBLE_QUANT)


def quantization_device(device: str) -> str:
    """Where the weights are quantised: ``cpu``, or for ``cuda`` this process's GPU (``LOCAL_RANK``, as set by
    Lightning's and torchrun's launchers; 0 otherwise). Lightning moves the module to its device afterwards
    (a no-op when it is this one)."""
    kind = torch.device(device).type
    if kind != "cuda":
        return kind
    index = int(os.environ.get("LOCAL_RANK", 0))
    return f"cuda:{index if index < torch.cuda.device_count() else 0}"


def keep_quantized_weights(model: nn.Module) -> nn.Module:
    """Switch off bitsandbytes' CPU inference path on ``model``'s 4-bit layers, in place. On a CPU with
    AVX512-BF16, a layer's first forward in eval mode without grad repacks its weights in place for a
    fused kernel, with the absmaxes rounded to bf16, and ``state_dict()`` packs them back by quantising
    the absmaxes again: both change ``W_hat``, so the feature network's pass (eval, no grad) would change
    the frozen base that training uses. Off, every forward multiplies by the same ``W_hat``."""
    for module in quantized_linears(model).values():
        module.support_avx512bf16_for_cpu = False
    return model


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of ``model``'s 4-bit linear layers (``bitsandbytes.nn.Linear4bit``); empty for a
    model without them (no model has them while bitsandbytes is not imported)."""
    if "bitsandbytes" not in sys.modules:
        return {}
    from bitsandbytes.nn import Linear4bit

    return {name: module for name, module in model.named_modules() if isinstance(module, Linear4bit)}


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_linears(model))


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``W_hat`` of a 4-bit linear layer, in the dtype it was quantised from (``model.dtype``): the matrix its
    forward multiplies by."""
    from bitsandbytes.functional import dequantize_4bit

    weight = module.weight
    return dequantize_4bit(weight.data, weight.quant_state)


def plain_model(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unquantised) model of ``model``'s architecture holding ``state`` (a full state dict under
    the plain model's names, e.g. dequantised weights), with no copy of the tensors: what ``save_pretrained``
    writes as a model any HF tool loads."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain
