"""The feature network phi (paper §3, eq. 2-7): a frozen, truncated copy of a causal LM.

``phi_c(y)`` embeds a completion y in its context c. Taps at depth fractions q (default 0.25, 0.5,
0.75) read the residual stream at

    layer(q) = max(1, min(L, floor(L * q)))

in ``hidden_states`` numbering (0 = embeddings, i = output of decoder layer i, BEFORE the final
norm; L = number of decoder layers). Qwen2.5-1.5B (L = 28) -> 7, 14, 21; Llama-3.2-1B (16) -> 4, 8, 12.
The copy keeps only the embeddings and the decoder layers up to the deepest tap: layers after it,
the final norm and the LM head are never run. Tap outputs are read with forward hooks.

Normalisation of taps h_1..h_m (one token's, or pooled ones):

- ``joint`` (the authors' released code, default): ``nrm(h) = [h_1; ...; h_m] / ||[h_1; ...; h_m]||``.
- ``per_layer`` (the paper's description): ``nrm(h) = [h_1/||h_1||; ...; h_m/||h_m||] / sqrt(m)``; the
  1/sqrt(m) keeps ``||nrm(h)|| = 1`` so rewards (paper eq. 6) have the same scale under both choices.

Pooling over the completion's G tokens t (in fp32):

- ``last_token``: ``phi = nrm(h(t_G))`` (code tasks);
- ``mean`` (the authors' released code, translation): ``phi = (1/G) sum_t nrm(h(t))``: every token's
  taps are normalised first, then averaged, with no renormalisation (so ``||phi|| <= 1``);
- ``mean_raw``: ``phi = nrm((1/G) sum_t h(t))``: the raw hidden states are averaged first, then
  normalised (a unit vector). The two orders give different features and rewards.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ebft.config import NORMALISATION, POOLING, FeatureNetworkSettings
from ebft.core.compat import backbone_forward, decoder_layers, get_backbone
from ebft.core.documents import StridedDocuments
from ebft.core.layout import StridedLayout
from ebft.core.strided import strided_hidden
from ebft.models.loading import load_model, resolve_attn
from ebft.models.lora import adapters_disabled



def tap_layers(num_layers: int, fractions) -> tuple[int, ...]:
    """``hidden_states`` indices ``max(1, min(L, floor(L*q)))`` of the depth fractions q in (0, 1]."""
    fractions = tuple(fractions)
    if not fractions:
        raise ValueError("layers=() taps nothing; give depth fractions in (0, 1], e.g. (0.25, 0.5, 0.75)")
    for q in fractions:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ValueError(f"layer fraction {q!r} is outside (0, 1]; give depth fractions such as 0.25, 0.5, 0.75")
    return tuple(max(1, min(num_layers, math.floor(num_layers * q))) for q in fractions)


class FeatureNetwork(nn.Module):
    """Frozen feature network. Build with ``FeatureNetwork(generator, ...)`` (a deep copy of its
    backbone), ``FeatureNetwork(generator, ..., adapters=peft_model)`` (the LoRA generator's own
    layers with the adapters disabled, no copy) or ``FeatureNetwork.from_name(name, ...)`` (loaded
    through ``ebft.models.loading``)."""

    def __init__(self, model: nn.Module, layers=(0.25, 0.5, 0.75), pooling: str = "last_token",
                 normalisation: str = "joint", adapters: nn.Module | None = None):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling='{pooling}' is unknown; use one of {', '.join(POOLING)}")
        if normalisation not in NORMALISATION:
            raise ValueError(f"normalisation='{normalisation}' is unknown; use one of {', '.join(NORMALISATION)}")
        self.num_layers = len(decoder_layers(model))
        self.taps = tap_layers(self.num_layers, layers)
        self.pooling, self.normalisation = pooling, normalisation
        if adapters is None:
            self.backbone = _truncated_copy(get_backbone(model), max(self.taps))
            self.backbone.requires_grad_(False)
        else:  # not submodules: the weights are the generator's, which owns (and trains the adapters of) them
            object.__setattr__(self, "backbone", _truncated_copy(get_backbone(model), max(self.taps), share=True))
        object.__setattr__(self, "adapters", adapters)
        self.eval()

    @classmethod
    def from_name(cls, name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                  quantization: str | None = None, device: str = "cpu", **kwargs):
        """Feature network from a model name (hub id, local dir, .gguf, embedded, tiny); with ``quantization``
        (``4bit``) loaded with 4-bit linear layers on ``device`` (``ebft.models.quantization``)."""
        model = load_model(name, dtype=dtype, attn_implementation=attn_implementation, quantization=quantization,
                           device=device)
        return cls(model, **kwargs)

    def train(self, mode: bool = True) -> FeatureNetwork:
        """Always eval: the network is frozen, so a parent's ``.train()`` must not switch on dropout."""
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        return len(self.taps) * self.backbone.config.hidden_size

    def tap_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Residual stream ``hidden_states[i]`` (batch, L, H) at every tap i, from one no-grad pass."""
        return self._taps(lambda: backbone_forward(self.backbone, input_ids, position_ids, attention_mask))

    def _taps(self, forward) -> list[torch.Tensor]:
        """The tapped residual streams of one no-grad run of ``forward`` (a pass of ``self.backbone``)."""
        captured: dict[int, torch.Tensor] = {}
        layers = decoder_layers(self.backbone)
        hooks = [layers[i - 1].register_forward_hook(_capture(captured, i)) for i in set(self.taps)]
        try:
            with torch.no_grad() if self.adapters is None else adapters_disabled(self.adapters):
                forward()
        finally:
            for hook in hooks:
                hook.remove()
        return [captured[i] for i in self.taps]

    def strided_features(self, row_ids: torch.Tensor, layout: StridedLayout,
                         documents: StridedDocuments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of every generated and ground-truth window of strided rows ``row_ids`` (batch, length).

        Returns ``gen`` (batch, NB, n, D) = phi_c(y_hat_{j,k}) and ``gt`` (batch, NB, D) = phi_c(y_k),
        from one pass over the row (:func:`ebft.core.strided.strided_hidden`; within documents with
        ``documents``).
        """
        states = self._taps(lambda: strided_hidden(self.backbone, row_ids, layout, documents))
        layout = layout.to(row_ids.device)
        gen = self._pool([h[:, layout.gen_feature_index(self.pooling)] for h in states])
        gt = self._pool([h[:, layout.gt_feature_index(self.pooling)] for h in states])
        return gen.transpose(1, 2), gt

    def sequence_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features (batch, D) of padded sequences, left or right padded.

        ``attention_mask`` (batch, L) marks real tokens; positions count real tokens only, so padding
        on either side gives the unpadded features. ``pool_mask`` (default: ``attention_mask``) marks
        the tokens pooled: their mean, or the last of them for last_token pooling.
        """
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must have the same (batch, L) shape")
        real = attention_mask.bool()
        pool = real if pool_mask is None else pool_mask.bool() & real
        if not pool.any(dim=1).all():
            raise ValueError("a sequence has no token to pool (pool_mask & attention_mask is empty in a row); "
                             "drop empty sequences or fix the masks")
        position_ids = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        states = self.tap_states(input_ids, position_ids, real.long())
        if self.pooling == "last_token":
            last = torch.arange(pool.shape[1], device=pool.device).masked_fill(~pool, -1).argmax(dim=1)
            return self._combine([h[torch.arange(h.shape[0], device=h.device), last].float() for h in states])
        weights = pool.float() / pool.sum(dim=1, keepdim=True)
        if self.pooling == "mean":
            return torch.einsum("bl,bld->bd", weights, self._combine([h.float() for h in states]))
        return self._combine([torch.einsum("bl,blh->bh", weights, h.float()) for h in states])

    def _pool(self, windows: list[torch.Tensor]) -> torch.Tensor:
        """Features from the taps' rows of each window: (..., H) rows for last_token, (..., G, H) for the
        means; the order of normalising and averaging is the pooling's (module docstring)."""
        windows = [w.float() for w in windows]
        if self.pooling == "mean":
            return self._combine(windows).mean(dim=-2)
        if self.pooling == "mean_raw":
            return self._combine([w.mean(dim=-2) for w in windows])
        return self._combine(windows)

    def _combine(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the pooled taps (..., H) into unit-norm features (..., D) per ``normalisation``."""
        if self.normalisation == "per_layer":
            pooled = [nn.functional.normalize(h, dim=-1) / math.sqrt(len(pooled)) for h in pooled]
            return torch.cat(pooled, dim=-1)
        return nn.functional.normalize(torch.cat(pooled, dim=-1), dim=-1)


def build_feature_network(spec: FeatureNetworkSettings, base: str, dtype: torch.dtype, device: str,
                          attn: str = "auto", generator: nn.Module | None = None,
                          adapters: nn.Module | None = None, quantization: str | None = None) -> FeatureNetwork:
    """THE feature network of training and evaluation, from the one spec (``feature_network``).

    ``spec.name`` when set, else the base model ``base`` (paper §2: phi is a frozen copy of the base
    model, for warm starts too, as the authors): built from ``generator`` when the caller's generator
    holds the base weights (a deep copy of its backbone; with LoRA, ``adapters`` = the ``peft`` model
    around it, the generator's own layers with the adapters disabled, no copy), else loaded. In
    ``dtype``, with the attention backend ``attn`` resolved for strided rows on ``device``; the caller
    moves it to its device (shared LoRA layers are not moved). ``quantization`` (``model.quantization``
    of a QLoRA run): a loaded network is loaded in 4 bits as the generator's base is (a shared one
    already is), so training never holds a full-precision copy."""
    kwargs = {"layers": spec.layers, "pooling": spec.pooling, "normalisation": spec.normalisation}
    if spec.name is None and generator is not None:
        network = FeatureNetwork(generator, adapters=adapters, **kwargs)
    else:
        network = FeatureNetwork.from_name(spec.name or base, dtype=dtype,
                                           attn_implementation=resolve_attn(attn, device, strided=True),
                                           quantization=quantization, device=device, **kwargs)
    return network.to(dtype)


def _capture(store: dict[int, torch.Tensor], index: int):
    def hook(module, args, output):
        store[index] = output[0] if isinstance(output, tuple) else output
    return hook


def _truncated_copy(backbone: nn.Module, depth: int, share: bool = False) -> nn.Module:
    """Deep copy of ``backbone`` with decoder layers 1..depth only (later layers are never copied) and
    the final norm replaced by identity; ``backbone`` itself is untouched. ``share``: the copy holds
    ``backbone``'s own submodules (and weights), a view that stops at layer ``depth``."""
    layers = decoder_layers(backbone)
    memo = {id(layer): None for layer in layers[depth:]}
    if share:
        memo.update({id(m): m for m in backbone.modules() if m is not backbone and id(m) not in memo})
    clone = copy.deepcopy(backbone, memo)
    clone.layers = nn.ModuleList(list(clone.layers.children())[:depth])
    if hasattr(clone, "norm"):
        clone.norm = nn.Identity()
    clone.config.num_hidden_layers = depth
    if getattr(clone.config, "layer_types", None) is not None:
        clone.config.layer_types = clone.config.layer_types[:depth]
    return clone
