"""Calibration metrics on held-out chunks: cross-entropy, the conditional feature-matching loss
(CFM), its whitened proxy and the FM profile over completion lengths.

For a context ``c`` with ground-truth completion ``y`` and ``n`` model samples
``y_hat_1..n``, the feature-matching loss is ``|| E phi(c:y_hat) - phi(c:y) ||^2``.
Its unbiased estimate from ``n >= 2`` samples and the whitened proxy of paper eq. 53 are
:func:`~ebft.objectives.rewards.cfm_estimate` and :func:`~ebft.objectives.rewards.whitened_fm_proxy`
(the same algebra as the rewards).

Contexts are the blocks of the strided layout (``x[0 : C + k*s]`` of every chunk, ground truth
``x[C + k*s : C + k*s + G]``); samples come from the strided KV-cached sampler with a seeded
``torch.Generator``, so two evaluations of the same model draw the same completions and every
model is scored on the same contexts. Reported values are means over all (chunk, block) contexts
with the standard error over chunks (the blocks of one chunk share text, so they are not
independent).

``eval.anchors=answer`` scores only the answer blocks (``ebft.core.anchors``, as training's
``method.anchors=answer``): the per-context values of the other blocks are NaN ("not scored"), and
means and standard errors are over the scored contexts (chunks without one are left out of the SE).
With ``data.document_mask`` every pass attends within each example (``ebft.core.documents``).

The FM profile (paper Figures 1-2) repeats the CFM estimate for completion lengths ``G`` in a list,
at fixed ``n`` and temperature. Each ``G`` uses only the first ``NB(G_max)`` blocks, the contexts
every length has, by cutting the chunk to ``C + (NB - 1)*s + G`` tokens: the curve then changes
with ``G`` only, never with the set of contexts (with answer anchors: the blocks whose ``G_max``
ground truth is an answer block, which are answer blocks at every shorter ``G`` too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ebft.core.compat import attn_implementation, backbone_forward, get_lm_head, lm_head, param_dtype
from ebft.core.documents import StridedDocuments
from ebft.core.masks import causal_chunk_mask
from ebft.objectives.losses import token_logprobs
from ebft.objectives.rewards import cfm_estimate, whitened_fm_proxy
from ebft.core.layout import StridedLayout
from ebft.rollout.sampler import sample_strided


@dataclass(frozen=True)
class Estimate:
    """Mean over contexts and its standard error over chunks."""

    mean: float
    se: float

    @classmethod
    def of(cls, values: torch.Tensor) -> Estimate:
        """``values`` (chunks, blocks) -> mean over the scored (not NaN) entries, SE of the per-chunk means
        of the chunks with a scored entry."""
        values = values.float()
        scored = ~values.isnan()
        per_chunk = values.nan_to_num(0).sum(-1)[scored.any(-1)] / scored.sum(-1)[scored.any(-1)]
        se = per_chunk.std().item() / math.sqrt(len(per_chunk)) if len(per_chunk) > 1 else float("nan")
        return cls(values[scored].mean().item(), se)


def fixed_subset(size: int, limit: int | None, seed: int, skip: int = 0) -> torch.Tensor:
    """Sorted indices of a fixed random subset of ``limit`` of ``size`` held-out items (chunks or rows;
    all of them when ``limit`` is None): the same seed always picks the same items. ``skip`` passes over
    the first items of the same fixed order, so ``skip=k`` gives a subset disjoint from ``limit=k``'s
    (e.g. from the chunks that chose a learning rate)."""
    if size < 1:
        raise ValueError("the held-out split is empty; raise data.val_size or lower task.seq_len")
    if skip >= size:
        raise ValueError(f"skipping {skip} of {size} held-out items leaves none; lower eval.cfm_skip")
    if (limit is None or limit >= size) and not skip:
        return torch.arange(size)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[skip:]
    return order[:limit].sort().values


def _batches(n: int, batch_size: int, desc: str, progress: bool):
    return tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def chunk_nll(model, input_ids: torch.Tensor, answer_mask: torch.Tensor, batch_size: int = 8,
              progress: bool = True, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced negative log-likelihood sums per held-out chunk: a (chunks, 4) float64 tensor of
    ``[sum of -log p over all targets, number of targets, sum over answer targets, answer targets]``.

    Targets are ``x_1 .. x_{T-1}`` scored by ``-log p(x_t | x_{<t})``; the first token of a chunk is
    never a target. The log-probs are :func:`~ebft.objectives.losses.token_logprobs` (chunked, with
    the LM head's bias), computed once for both masks; with ``doc_ids`` (chunks, T) within each
    example (document masking).
    """
    head = lm_head(model)
    device = head.weight.device
    rows = []
    was_training = model.training
    model.eval()
    try:
        for start in _batches(len(input_ids), batch_size, "held-out CE", progress):
            ids = input_ids[start:start + batch_size].to(device)
            if doc_ids is None:
                hidden, _ = backbone_forward(model, ids, torch.arange(ids.shape[1], device=device))
            else:
                mask, positions = causal_chunk_mask(doc_ids[start:start + batch_size].to(device),
                                                    attn_implementation(model), param_dtype(model))
                hidden, _ = backbone_forward(model, ids, positions, mask)
            nll = -token_logprobs(hidden[:, :-1], head.weight, ids[:, 1:], lm_head_bias=head.bias,
                                  softcap=head.softcap).double()
            answer = answer_mask[start:start + batch_size, 1:].to(device, torch.float64)
            rows.append(torch.stack([nll.sum(-1), torch.full_like(nll[:, 0], nll.shape[1]), (nll * answer).sum(-1),
                                     answer.sum(-1)], -1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows)


def validation_ce(sums: torch.Tensor) -> dict[str, float]:
    """Cross-entropy per token over held-out chunks from :func:`chunk_nll`'s sums: ``ce`` (all tokens)
    and ``ce_answer`` (answer tokens; NaN when there are none).

    ``CE = sum over counted targets t of -log p(x_t | x_{<t}) / number of counted targets``, summed
    over the whole set (not a mean of per-chunk means). This is
    :func:`~ebft.objectives.losses.cross_entropy_term`, what validation during training logs.
    """
    total = sums.sum(0)
    return {"ce": (total[0] / total[1]).item(), "ce_answer": (total[2] / total[3]).item()}


def context_fm(model, feature_network, input_ids: torch.Tensor, layout: StridedLayout, temperature: float = 0.6,
               seed: int = 43, batch_size: int = 8, whitening: str | None = "reference", progress: bool = True,
               desc: str = "CFM", scored: torch.Tensor | None = None,
               doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CFM and its whitened proxy per context: two (chunks, NB) tensors (no proxy when ``whitening`` is None).

    For every chunk, ``n`` completions of ``G`` tokens per block are drawn from ``model`` with
    :func:`~ebft.rollout.sampler.sample_strided` (one seeded generator for the whole pass) and
    embedded with the frozen ``feature_network`` (a :class:`~ebft.models.features.FeatureNetwork`) in one
    strided pass; then :func:`~ebft.objectives.rewards.cfm_estimate` and
    :func:`~ebft.objectives.rewards.whitened_fm_proxy` per context. ``scored`` (chunks, NB): the contexts
    scored, NaN elsewhere (None: all); ``doc_ids`` (chunks, >= T): sampling and features within each
    example (document masking).
    """
    if layout.num_samples < 2:
        raise ValueError(f"CFM needs n >= 2 samples per context, got n={layout.num_samples}; raise eval.cfm_num_samples")
    device = get_lm_head(model).weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cfm, proxy = [], []
    for start in _batches(len(input_ids), batch_size, desc, progress):
        part = slice(start, start + batch_size)
        ids = input_ids[part, :layout.seq_len].to(device)
        docs = None if doc_ids is None else StridedDocuments(layout, doc_ids[part, :layout.seq_len].to(device))
        tokens = sample_strided(model, ids, layout, temperature=temperature, generator=generator, documents=docs)
        gen, gt = feature_network.strided_features(layout.scatter_generated(ids, tokens), layout.to(device), docs)
        cfm.append(cfm_estimate(gen, gt).cpu())
        if whitening is not None:
            proxy.append(whitened_fm_proxy(gen, gt, whitening).cpu())
    cfm, proxy = torch.cat(cfm), torch.cat(proxy) if proxy else None
    if scored is None:
        return cfm, proxy
    return cfm.masked_fill(~scored, math.nan), None if proxy is None else proxy.masked_fill(~scored, math.nan)


def profile_layouts(seq_len: int, context_len: int, stride: int, lengths: Sequence[int],
                    num_samples: int) -> dict[int, StridedLayout]:
    """One layout per completion length ``G`` over the same contexts: the first
    ``NB = floor((T - G_max - C) / s) + 1`` blocks, chunk cut to ``C + (NB - 1)*s + G`` tokens."""
    lengths = sorted(set(int(g) for g in lengths))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"FM profile lengths {lengths} must be positive integers")
    if lengths[-1] > seq_len - context_len:
        raise ValueError(f"FM profile length G={lengths[-1]} does not fit a chunk of T={seq_len} tokens after a "
                         f"context of C={context_len}: drop it from eval.profile_lengths (G <= "
                         f"{seq_len - context_len}) or raise task.seq_len")
    blocks = (seq_len - lengths[-1] - context_len) // stride + 1
    return {g: StridedLayout(context_len + (blocks - 1) * stride + g, context_len, stride, g, num_samples)
            for g in lengths}


def fm_profile(model, feature_network, input_ids: torch.Tensor, layouts: dict[int, StridedLayout], temperature: float = 0.6,
               seed: int = 43, batch_size: int = 8, progress: bool = True, scored: torch.Tensor | None = None,
               doc_ids: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Unwhitened CFM per context (a (chunks, NB) tensor) per completion length ``G`` (layouts from
    :func:`profile_layouts`); every length starts its sampler from ``seed``, so all models see the same
    contexts and RNG. ``scored`` (the same contexts for every G) and ``doc_ids`` as in :func:`context_fm`."""
    return {g: context_fm(model, feature_network, input_ids, layout, temperature, seed, batch_size, whitening=None,
                          progress=progress, desc=f"FM profile G={g}", scored=scored, doc_ids=doc_ids)[0]
            for g, layout in layouts.items()}
