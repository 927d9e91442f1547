"""The one place that knows how to call an HF causal LM across transformers versions.

The sampler, the feature network and the loss code call the backbone (the decoder stack without the
LM head) through ``backbone_forward`` and apply the LM head themselves on the rows they need.

Version differences handled here:
- transformers 5.24 names the cache argument ``cache=`` (``past_key_values=`` is a deprecated
  alias); 5.17 knows only ``past_key_values=``. The name is read once per backbone class from the
  signature of its ``forward``.
- Both versions pass a 4D ``attention_mask`` through unchanged (see ``ebft.core.masks``), and a
  ``DynamicCache`` is updated in place, so the cache object given is the one returned.

Model families. Strided rollouts re-implement the last step of the model's own forward (the LM
head on chosen rows) and replace its attention mask, so a family is supported only when both are
reproduced exactly; ``SUPPORTED_FAMILIES`` lists them (``config.model_type``) and every other family
is refused with a message. What differs between the supported ones:

- the LM head's bias (Phi): ``logits = h W^T + b``;
- final-logit soft-capping (Gemma-2): ``logits = c * tanh((h W^T + b) / c)`` with
  ``c = config.final_logit_softcapping``, applied before the sampling temperature;
- attention-logit soft-capping (Gemma-2): the attention function applies it; eager and
  flex_attention do, sdpa cannot, so such a family is loaded with eager where sdpa was asked
  (``attention_for``) and refused with sdpa (``check_strided``);
- sliding-window attention (Mistral, Gemma-2, Qwen2 with ``use_sliding_window``): the strided mask
  replaces the model's sliding-window mask, and the KV cache holds every key (``new_cache``), so
  results equal the model's own forward exactly when no key is a window away from its query: every
  position of a chunk of ``T`` tokens is ``< T``, hence ``T <= sliding_window`` (``check_strided``).

``tests/test_families.py`` checks, for a tiny random config of every supported family, that
strided log-probs and the sampler's distributions equal ``model(input_ids).logits``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CACHE_KWARG: dict[type, str] = {}

# config.model_type -> what it covers (see the module docstring)
SUPPORTED_FAMILIES = {
    "llama": "Llama, SmolLM",
    "mistral": "Mistral (sliding window >= task.seq_len)",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma-2 (final and attention logit soft-capping; sliding window >= task.seq_len)",
    "phi": "Phi-1/1.5/2 (biased LM head)",
}


class UnsupportedModelError(ValueError):
    """A model family or setting whose logits strided rollouts cannot reproduce exactly."""


def model_family(model: nn.Module) -> str:
    """``config.model_type`` of ``model`` (a causal LM or its backbone), refused unless supported."""
    family = str(getattr(model.config, "model_type", ""))
    if family not in SUPPORTED_FAMILIES:
        known = "; ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
        raise UnsupportedModelError(
            f"model family '{family}' ({type(model).__name__}) is not supported: strided rollouts apply the LM "
            f"head and the attention mask themselves and are only exact for the families tested in "
            f"tests/test_families.py: {known}. Use a model of one of these families")
    return family


def attention_for(config, attn_implementation: str) -> str:
    """The attention backend to load a model of ``config`` with: sdpa cannot soft-cap attention
    logits, so a family that does (Gemma-2) gets eager instead of sdpa; anything else as asked."""
    if attn_implementation == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return attn_implementation


def check_strided(model: nn.Module, seq_len: int) -> None:
    """Refuse what the strided mask cannot reproduce for chunks of ``seq_len`` tokens: an unsupported
    family, attention soft-capping under sdpa, a sliding window shorter than the chunk."""
    model_family(model)
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None and attn_implementation(model) == "sdpa":
        raise UnsupportedModelError(
            f"{type(model).__name__} soft-caps attention logits, which sdpa ignores; load it with "
            "model.attn_implementation=eager or flex_attention (auto picks one)")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window is not None and int(window) < seq_len:
        raise UnsupportedModelError(
            f"{type(model).__name__} has sliding_window={window} < task.seq_len={seq_len}: the strided mask "
            f"attends the whole chunk, the model only the last {window} positions; use task.seq_len <= {window}")


@dataclass(frozen=True)
class LMHead:
    """The output layer of a supported family: ``logits = cap(h W^T + b)`` with
    ``cap(z) = softcap * tanh(z / softcap)`` when the family soft-caps its final logits, else ``z``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., H), in the weight's (or autocast's) dtype."""
        logits = F.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``LlamaModel`` inside ``LlamaForCausalLM``); a backbone maps to itself."""
    return model.base_model


def get_lm_head(model: nn.Module) -> nn.Module:
    """The output projection hidden -> vocabulary logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head; pass the causal LM (AutoModelForCausalLM), "
                         "not its backbone")
    return head


def lm_head(model: nn.Module) -> LMHead:
    """Weight, bias and final soft-cap of ``model``'s LM head (refused for an unsupported family)."""
    model_family(model)
    head = get_lm_head(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return LMHead(head.weight, head.bias, None if softcap is None else float(softcap))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (``backbone.layers`` in Llama, Qwen2, Mistral, Gemma, SmolLM)."""
    backbone = get_backbone(model)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(backbone).__name__} keeps no decoder layers in `.layers`; only Llama-style "
                         "decoders (Llama, Qwen2, Mistral, Gemma, SmolLM) are supported")
    return layers


def attn_implementation(model: nn.Module) -> str:
    """The attention backend the model was loaded with (sdpa, eager, flex_attention, ...)."""
    return model.config._attn_implementation


def param_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of the model's floating-point weights (the dtype its additive masks must have)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def new_cache(model: nn.Module):
    """An empty ``DynamicCache`` whose layers keep every key: built without the config, since a
    config with sliding windows would give sliding layers that drop the chunk's early keys once the
    cache outgrows the window (the strided cache holds ``T + g*n*NB`` rows, positions stay ``< T``)."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_kwarg(backbone: nn.Module) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier), read from the signature once."""
    cls = type(backbone)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(backbone.forward).parameters
        if "cache" in params:
            _CACHE_KWARG[cls] = "cache"
        elif "past_key_values" in params:
            _CACHE_KWARG[cls] = "past_key_values"
        else:
            raise ValueError(f"{cls.__name__}.forward takes neither `cache` nor `past_key_values`; "
                             "use a transformers causal LM (transformers 5.17 or later)")
    return _CACHE_KWARG[cls]


def backbone_forward(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, cache=None):
    """Run the backbone; return ``(last_hidden_state, cache)``.

    ``input_ids`` (batch, L); ``position_ids`` (L,) or (batch, L); ``attention_mask`` None (causal),
    a 2D padding mask (batch, cached + L) or a prepared 4D mask (see ``ebft.core.masks``). With a
    ``cache`` the new keys and values are appended to it. The hidden states are after the final norm.
    """
    backbone = get_backbone(model)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    out = backbone(input_ids=input_ids, position_ids=position_ids.expand(input_ids.shape[0], -1),
                   attention_mask=attention_mask, use_cache=cache is not None, **{cache_kwarg(backbone): cache})
    return out.last_hidden_state, cache
