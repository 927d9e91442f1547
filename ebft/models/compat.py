"""The one place that knows how to call an HF causal LM across transformers versions.

The sampler, the feature network and the loss code call the backbone (the decoder stack without the
LM head) through ``backbone_forward`` and apply the LM head themselves on the rows they need.

Version differences handled here:
- transformers 5.24 names the cache argument ``cache=`` (``past_key_values=`` is a deprecated
  alias); 5.17 knows only ``past_key_values=``. The name is read once per backbone class from the
  signature of its ``forward``.
- Both versions pass a 4D ``attention_mask`` through unchanged (see ``ebft.rollout.masks``), and a
  ``DynamicCache`` is updated in place, so the cache object given is the one returned.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

_CACHE_KWARG: dict[type, str] = {}


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
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


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
    a 2D padding mask (batch, cached + L) or a prepared 4D mask (see ``ebft.rollout.masks``). With a
    ``cache`` the new keys and values are appended to it. The hidden states are after the final norm.
    """
    backbone = get_backbone(model)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    out = backbone(input_ids=input_ids, position_ids=position_ids.expand(input_ids.shape[0], -1),
                   attention_mask=attention_mask, use_cache=cache is not None, **{cache_kwarg(backbone): cache})
    return out.last_hidden_state, cache
