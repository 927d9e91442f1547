"""Strided block-parallel sampling (paper Algorithm 1 step 2, appendix F).

For each chunk ``x[0:T]`` and each of the ``n * NB`` (sample, block) pairs, draw ``G`` tokens from
``p_theta(. | x[0 : C + k*s], previous tokens of the pair)`` as a ``(batch, n, NB, G)`` tensor:
``sample_strided`` makes one causal prefill of the chunk into a KV cache, then ``G - 1`` incremental
steps; step g feeds the ``n*NB`` tokens of step g (positions ``C + k*s + g``) with the strided step
mask and samples step g+1 from their logits. Step 0 is sampled from the prefill logits at rows
``C + k*s - 1``. Cost: ``T + (G-1)*n*NB`` token-forwards. Its exact oracle without a cache and the
released code's scheme (benchmark baselines) are in ``bench/samplers.py``.

Sampling draws from ``softmax(logits / temperature)`` in fp32, restricted to the top-p nucleus
(``top_p = 1`` keeps all tokens), with one inverse-CDF draw per step over the ``(batch, n, NB)``
grid (``sample_from_logits``); the cached sampler and the uncached oracle draw in the same order, so
with the same ``torch.Generator`` they return the same tokens. ``temperature = 0`` takes the argmax.
The LM head (the model's own: bias and final soft-cap included, ``ebft.core.compat.lm_head``) is
applied only to the rows that are sampled from.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ebft.core.compat import (LMHead, attn_implementation, backbone_forward, check_strided, lm_head, new_cache,
                                param_dtype)
from ebft.core.documents import StridedDocuments
from ebft.core.layout import StridedLayout
from ebft.core.masks import document_mask, step_mask, strided_mask


@contextmanager
def sampling_mode(model: nn.Module):
    """Eval mode (no dropout) and no autograd while sampling; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def check_sampling_args(input_ids: torch.Tensor, layout: StridedLayout, temperature: float, top_p: float) -> None:
    """Raise ValueError, naming the fix, when ``input_ids`` does not fit ``layout`` or a sampling knob is
    out of range."""
    if input_ids.dim() != 2 or input_ids.shape[1] != layout.seq_len:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, T={layout.seq_len}) "
                         f"for {layout}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative; use 0 (greedy) or a positive value")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]; use 1.0 to switch nucleus sampling off")


def sample_from_logits(logits: torch.Tensor, temperature: float, top_p: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """One token per leading index of ``logits`` (..., V): argmax if temperature is 0, else a draw
    from the top-p nucleus of ``softmax(logits / temperature)`` (the smallest set of most likely
    tokens whose mass reaches top_p).

    Draws by inverse CDF: one uniform number per row, located in the cumulative sum of the
    (unnormalised) probabilities with a binary search. ``torch.multinomial`` draws the same
    distribution but spends one exponential random number per vocabulary entry (on CPU about a
    quarter of the sampler's time at V = 49k).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    order = None
    if top_p < 1:
        probs = torch.softmax(flat / temperature, dim=-1)
        weights, order = probs.sort(dim=-1, descending=True)
        mass_before = weights.cumsum(dim=-1) - weights
        weights = weights.masked_fill(mass_before >= top_p, 0.0)
    else:
        weights = (flat - flat.amax(dim=-1, keepdim=True)).div_(temperature).exp_()
    cdf = weights.cumsum_(dim=-1) if order is None else weights.cumsum(dim=-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=flat.shape[-1] - 1)
    if order is not None:
        index = order.gather(-1, index)
    return index.view(logits.shape[:-1])


def logits_at(head: LMHead, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """LM-head logits of ``hidden`` (batch, L, H) at ``rows`` (any shape) -> (batch, *rows.shape, V)."""
    picked = hidden[:, rows.reshape(-1)]
    return head.logits(picked).view(hidden.shape[0], *rows.shape, -1)


def sample_strided(model: nn.Module, input_ids: torch.Tensor, layout: StridedLayout, temperature: float = 0.6,
                   top_p: float = 1.0, generator: torch.Generator | None = None,
                   documents: StridedDocuments | None = None) -> torch.Tensor:
    """Strided sampling with a KV cache: ``input_ids`` (batch, T) -> tokens (batch, n, NB, G). With
    ``documents`` (``ebft.core.documents``) the prefill and every step attend within each row's document,
    at the documents' position ids."""
    check_sampling_args(input_ids, layout, temperature, top_p)
    check_strided(model, layout.seq_len)
    layout = layout.to(input_ids.device)
    batch, n, NB, G, T = input_ids.shape[0], layout.num_samples, layout.num_blocks, layout.gen_len, layout.seq_len
    impl, dtype, head = attn_implementation(model), param_dtype(model), lm_head(model)
    positions = layout.position_ids if documents is None else documents.position_ids
    tokens = torch.empty(batch, n, NB, G, dtype=torch.long, device=input_ids.device)
    with sampling_mode(model):
        cache = new_cache(model)
        # the chunk's causal mask (within documents: the batch's own); without documents the model builds
        # it for sdpa (fused causal kernels), and under flex the layout's cached BlockMask saves building one
        if documents is not None:
            prefill = document_mask(documents, impl, dtype, slice(0, T), T)
        else:
            prefill = strided_mask(layout, impl, dtype, slice(0, T), T) if impl == "flex_attention" else None
        hidden, cache = backbone_forward(model, input_ids, positions[..., :T], prefill, cache)
        logits = logits_at(head, hidden, layout.context_end - 1)
        tokens[..., 0] = sample_from_logits(logits.unsqueeze(1).expand(batch, n, NB, -1), temperature, top_p, generator)
        for g in range(G - 1):
            rows = layout.step_rows(g)
            hidden, cache = backbone_forward(model, tokens[..., g].reshape(batch, n * NB), positions[..., rows],
                                             step_mask(layout, g, impl, dtype, documents), cache)
            logits = head.logits(hidden).view(batch, n, NB, -1)
            tokens[..., g + 1] = sample_from_logits(logits, temperature, top_p, generator)
    return tokens
