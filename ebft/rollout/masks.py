"""The strided attention rule of ``StridedLayout.allowed`` in the form each attention backend takes.

HF causal LMs (Llama, Qwen2, ... in transformers 5.17 and 5.24 alike) use a 4D ``attention_mask``
as given: ``masking_utils._preprocess_mask_arguments`` returns any 4D tensor or ``BlockMask``
unchanged ("already prepared, or custom"). What the attention function then does with it differs:

- ``sdpa``: the mask goes to ``scaled_dot_product_attention``; a bool mask means True = attend.
- ``eager``: the mask is ADDED to the scores (``scores + mask``). A bool mask would add 0 or 1 and
  silently attend everywhere, so eager gets the additive float mask (0 = attend, ``finfo.min`` = not).
- ``flex_attention``: a ``BlockMask`` built from the same rule as a ``mask_mod`` (GPU only; the flex
  module is imported only when one is asked for).

Queries are a set of rows of the strided row (all of them, or the ``n*NB`` rows of one sampling
step) and keys the first ``num_keys`` rows — what a KV cache holds. Masks have batch size 1 and
broadcast over the batch. flash-attention cannot express this mask and is refused.
"""

from __future__ import annotations

import torch

from ebft.rollout.layout import StridedLayout

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def dense_mask(layout: StridedLayout, query_rows: slice | torch.Tensor | None = None,
               num_keys: int | None = None) -> torch.Tensor:
    """Bool mask ``(1, 1, Q, K)`` for sdpa: True where a query row may attend a key row."""
    return layout.allowed(query_rows, num_keys)[None, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float mask for eager attention: 0 where ``allowed``, ``torch.finfo(dtype).min`` elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def block_mask(layout: StridedLayout, query_rows: slice | torch.Tensor | None = None,
               num_keys: int | None = None):
    """FlexAttention ``BlockMask`` of the same rule, on the layout's device (use a CUDA layout)."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_rows = torch.arange(layout.length, device=layout.device)
    if query_rows is not None:
        q_rows = q_rows[query_rows]
    num_keys = layout.length if num_keys is None else num_keys
    limit, group = layout.row_limit, layout.row_group

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_rows[q_idx]
        return (kv_idx < limit[q]) | ((group[q] == group[kv_idx]) & (group[q] >= 0) & (kv_idx <= q))

    return create_block_mask(mask_mod, None, None, len(q_rows), num_keys, device=layout.device)


def strided_mask(layout: StridedLayout, attn_implementation: str, dtype: torch.dtype = torch.float32,
                 query_rows: slice | torch.Tensor | None = None, num_keys: int | None = None):
    """The mask for ``attn_implementation``: bool (sdpa), additive ``dtype`` (eager) or BlockMask (flex)."""
    if attn_implementation == "sdpa":
        return dense_mask(layout, query_rows, num_keys)
    if attn_implementation == "eager":
        return additive_mask(dense_mask(layout, query_rows, num_keys), dtype)
    if attn_implementation == "flex_attention":
        return block_mask(layout, query_rows, num_keys)
    raise ValueError(
        f"attn_implementation='{attn_implementation}' cannot take the strided attention mask; "
        f"load the model with one of {', '.join(IMPLEMENTATIONS)} (flash-attention only does plain causal)")


def step_mask(layout: StridedLayout, step: int, attn_implementation: str, dtype: torch.dtype = torch.float32):
    """Mask of a KV-cached sampling step: queries = the ``n*NB`` tokens of ``step``, keys = the chunk
    plus every generated row up to and including this step (the cache after feeding it)."""
    rows = layout.step_rows(step)
    return strided_mask(layout, attn_implementation, dtype, query_rows=rows, num_keys=rows.stop)
