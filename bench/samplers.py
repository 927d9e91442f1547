"""Samplers and switches kept for benchmarks and as test oracles, not used by training or evaluation.

- ``sample_strided_nocache``: the exact oracle of :func:`ebft.rollout.sampler.sample_strided` (paper
  Algorithm 1 step 2, appendix F) without a KV cache: ``G`` forwards of the whole strided row with
  the full mask (not-yet-sampled rows hold placeholders that no earlier row can see); same draws for
  the same ``torch.Generator``.
- ``sample_authors_style``: the released code's scheme, the benchmark baseline: ``n`` copies of the
  chunk, one row per sample, ``G`` forwards of the whole row without a cache and with the dense mask.
- ``dense_strided_sdpa()``: within the block, strided rows use sdpa with the dense mask instead of
  the banded path of :mod:`ebft.core.masks` (for comparisons).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ebft.core import masks
from ebft.core.compat import lm_head
from ebft.core.layout import StridedLayout
from ebft.core.strided import strided_hidden
from ebft.rollout.sampler import check_sampling_args, logits_at, sample_from_logits, sampling_mode


@contextlib.contextmanager
def dense_strided_sdpa():
    """Within the block, strided rows use sdpa with the dense mask (``masks.BANDED_SDPA = "never"``)."""
    previous, masks.BANDED_SDPA = masks.BANDED_SDPA, "never"
    try:
        yield
    finally:
        masks.BANDED_SDPA = previous


def _sample_full_rows(model: nn.Module, chunk_ids: torch.Tensor, layout: StridedLayout, temperature: float,
                      top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """``G`` forwards of the whole strided row (``strided_hidden``), no cache: step g is sampled from the
    logits at ``score_index[..., g]``. Returns (batch, n, NB, G)."""
    batch, n, NB, G = chunk_ids.shape[0], layout.num_samples, layout.num_blocks, layout.gen_len
    head = lm_head(model)
    tokens = torch.zeros(batch, n, NB, G, dtype=torch.long, device=chunk_ids.device)
    with sampling_mode(model):
        for g in range(G):
            hidden = strided_hidden(model, layout.scatter_generated(chunk_ids, tokens), layout)
            logits = logits_at(head, hidden, layout.score_index[..., g])
            tokens[..., g] = sample_from_logits(logits, temperature, top_p, generator)
    return tokens


def sample_strided_nocache(model: nn.Module, input_ids: torch.Tensor, layout: StridedLayout,
                           temperature: float = 0.6, top_p: float = 1.0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact oracle of ``sample_strided`` without a cache (same draws for the same generator)."""
    check_sampling_args(input_ids, layout, temperature, top_p)
    return _sample_full_rows(model, input_ids, layout.to(input_ids.device), temperature, top_p, generator)


def sample_authors_style(model: nn.Module, input_ids: torch.Tensor, layout: StridedLayout,
                         temperature: float = 0.6, top_p: float = 1.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline: each of the ``n`` samples gets its own copy of the chunk (a strided row with n = 1)
    and ``G`` uncached forwards of that row with the dense mask, as the released code. Same
    distribution as ``sample_strided``, other draws."""
    check_sampling_args(input_ids, layout, temperature, top_p)
    n = layout.num_samples
    single = StridedLayout(layout.seq_len, layout.context_len, layout.stride, layout.gen_len, 1).to(input_ids.device)
    copies = input_ids.repeat_interleave(n, dim=0)
    with dense_strided_sdpa():
        tokens = _sample_full_rows(model, copies, single, temperature, top_p, generator)
    return tokens.view(input_ids.shape[0], n, layout.num_blocks, layout.gen_len)
