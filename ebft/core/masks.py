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

Masks are built once per (layout, implementation, dtype, query rows, keys) and cached on the layout
(one cache per device copy of it): callers get the same tensor or BlockMask back and must not
modify it. Document masking (``ebft.core.documents``) restricts the rule to each row's example; that
mask depends on the batch, so :func:`document_mask` (strided rows, sampling steps) and
:func:`causal_chunk_mask` (a plain causal pass over chunks) build it per batch, with batch size B, and
sdpa takes it as a plain dense mask (not banded).

Banded sdpa (the strided row on CPU). A dense (L, L) mask makes sdpa compute every query-key pair,
but most are masked: a generated row sees at most ``T + G`` keys of the ``L = T + n*NB*G``. The
full-row sdpa mask carries its layout, and the ``sdpa`` entry of transformers' attention registry
is wrapped (once, when such a mask is first built) so that a forward over the whole row with that
mask runs as: the chunk rows with plain causal sdpa, then the generated rows in bands of a few
blocks (block-major order), each band attending only to the chunk prefix its last context needs and
to the band's own generated rows, with the exact mask restricted to those keys. Same result as the
dense mask (fused sdpa kernels forward and backward, no extra memory); about 2x less attention work
at T = 256 and more at larger T. Every other call (plain causal, sampling steps, any mask without a
layout) goes to transformers' sdpa unchanged. ``BANDED_SDPA`` picks when it is used: ``"cpu"``
(default; on GPU use ``flex_attention``, whose BlockMask skips the masked blocks), ``"always"`` or
``"never"`` (``bench/samplers.py``'s ``dense_strided_sdpa()`` switches it off for a block of code).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ebft.core.documents import StridedDocuments, causal_document_mask, chunk_segments
from ebft.core.layout import StridedLayout

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
BANDED_SDPA = "cpu"          # "cpu" | "always" | "never": see the module docstring
BAND_ROWS = 128              # target number of generated query rows per band

_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layout -> {key: mask}


def dense_mask(layout: StridedLayout, query_rows: slice | torch.Tensor | None = None,
               num_keys: int | None = None) -> torch.Tensor:
    """Bool mask ``(1, 1, Q, K)`` for sdpa: True where a query row may attend a key row."""
    return layout.allowed(query_rows, num_keys)[None, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float mask for eager attention: 0 where ``allowed``, ``torch.finfo(dtype).min`` elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def block_mask(layout: StridedLayout, query_rows: slice | torch.Tensor | None = None,
               num_keys: int | None = None, documents: StridedDocuments | None = None):
    """FlexAttention ``BlockMask`` of the same rule, on the layout's device (use a CUDA layout); with
    ``documents``, restricted to each row's document, with their batch size."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_rows = torch.arange(layout.length, device=layout.device)
    if query_rows is not None:
        q_rows = q_rows[query_rows]
    num_keys = layout.length if num_keys is None else num_keys
    limit, group = layout.row_limit, layout.row_group

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_rows[q_idx]
        return (kv_idx < limit[q]) | ((group[q] == group[kv_idx]) & (group[q] >= 0) & (kv_idx <= q))

    batch = None
    if documents is not None:
        segment, strided, batch = documents.segment, mask_mod, documents.batch_size

        def mask_mod(b, h, q_idx, kv_idx):
            return strided(b, h, q_idx, kv_idx) & (segment[b, q_rows[q_idx]] == segment[b, kv_idx])

    return create_block_mask(mask_mod, batch, None, len(q_rows), num_keys, device=layout.device)


def strided_mask(layout: StridedLayout, attn_implementation: str, dtype: torch.dtype = torch.float32,
                 query_rows: slice | torch.Tensor | None = None, num_keys: int | None = None):
    """The mask for ``attn_implementation``: bool (sdpa), additive ``dtype`` (eager) or BlockMask (flex).

    Cached per layout (see the module docstring); a tensor ``query_rows`` is not cached. The
    full-row sdpa mask carries ``strided_layout`` (it selects banded sdpa).
    """
    _check_implementation(attn_implementation)
    if isinstance(query_rows, torch.Tensor):
        return _build_mask(layout, attn_implementation, dtype, query_rows, num_keys)
    rows_key = None if query_rows is None else (query_rows.start, query_rows.stop, query_rows.step)
    key = (attn_implementation, dtype if attn_implementation == "eager" else None, rows_key, num_keys)
    cache = _MASKS.setdefault(layout, {})
    if key not in cache:
        cache[key] = _build_mask(layout, attn_implementation, dtype, query_rows, num_keys)
    return cache[key]


def _check_implementation(attn_implementation: str) -> None:
    if attn_implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation='{attn_implementation}' cannot take the strided attention mask; "
            f"load the model with one of {', '.join(IMPLEMENTATIONS)} (flash-attention only does plain causal)")


def _build_mask(layout: StridedLayout, attn_implementation: str, dtype: torch.dtype,
                query_rows: slice | torch.Tensor | None, num_keys: int | None):
    if attn_implementation == "sdpa":
        mask = dense_mask(layout, query_rows, num_keys)
        if query_rows is None and num_keys in (None, layout.length):
            mask.strided_layout = layout
            _install_banded_sdpa()
        elif isinstance(query_rows, slice) and query_rows.step in (None, 1) and num_keys == query_rows.stop:
            step, extra = divmod(query_rows.start - layout.seq_len, layout.num_samples * layout.num_blocks)
            if (extra == 0 and 0 <= step < layout.gen_len
                    and query_rows.stop - query_rows.start == layout.num_samples * layout.num_blocks):
                mask.strided_step = (layout, step)
                _install_banded_sdpa()
        return mask
    if attn_implementation == "eager":
        return additive_mask(dense_mask(layout, query_rows, num_keys), dtype)
    return block_mask(layout, query_rows, num_keys)


def step_mask(layout: StridedLayout, step: int, attn_implementation: str, dtype: torch.dtype = torch.float32,
              documents: StridedDocuments | None = None):
    """Mask of a KV-cached sampling step: queries = the ``n*NB`` tokens of ``step``, keys = the chunk
    plus every generated row up to and including this step (the cache after feeding it); with
    ``documents``, restricted to each row's document (:func:`document_mask`)."""
    rows = layout.step_rows(step)
    if documents is not None:
        return document_mask(documents, attn_implementation, dtype, query_rows=rows, num_keys=rows.stop)
    return strided_mask(layout, attn_implementation, dtype, query_rows=rows, num_keys=rows.stop)


def document_mask(documents: StridedDocuments, attn_implementation: str, dtype: torch.dtype = torch.float32,
                  query_rows: slice | None = None, num_keys: int | None = None):
    """The strided rule restricted to documents (``ebft.core.documents``) for ``attn_implementation``:
    bool ``(B, 1, Q, K)`` (sdpa), additive ``dtype`` (eager) or a BlockMask with batch size B (flex).
    Built per batch, never cached; sdpa takes it as a plain dense mask (no banded path)."""
    _check_implementation(attn_implementation)
    if attn_implementation == "flex_attention":
        return block_mask(documents.layout, query_rows, num_keys, documents)
    allowed = documents.allowed(query_rows, num_keys)[:, None]
    return allowed if attn_implementation == "sdpa" else additive_mask(allowed, dtype)


def causal_chunk_mask(doc_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype = torch.float32):
    """``(mask, position_ids)`` of a plain causal pass over chunks ``doc_ids`` (B, T) with document masking
    (``ebft.core.documents.causal_document_mask``): bool (sdpa), additive (eager) or a BlockMask (flex)."""
    _check_implementation(attn_implementation)
    allowed, positions = causal_document_mask(doc_ids)
    if attn_implementation == "sdpa":
        return allowed, positions
    if attn_implementation == "eager":
        return additive_mask(allowed, dtype), positions
    from torch.nn.attention.flex_attention import create_block_mask

    segment = chunk_segments(doc_ids)[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segment[b, q_idx] == segment[b, kv_idx])

    T = doc_ids.shape[1]
    return create_block_mask(mask_mod, doc_ids.shape[0], None, T, T, device=doc_ids.device), positions


# ------------------------------------------------------------------------------------ banded sdpa
_ORIGINAL_SDPA = None


def _install_banded_sdpa() -> None:
    """Wrap transformers' ``sdpa`` attention function once: masks carrying a ``strided_layout`` take
    the banded path, every other call is passed through unchanged."""
    global _ORIGINAL_SDPA
    if _ORIGINAL_SDPA is not None:
        return
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(original, "_ebft_banded", False):  # a reload of this module
        original = original._ebft_original
    _ORIGINAL_SDPA = original

    def sdpa_with_strided_bands(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        plain = (kwargs.get("position_bias") is None and kwargs.get("softcap") is None
                 and not kwargs.get("output_attentions", False))
        if plain and _use_banded(query.device):
            layout = getattr(attention_mask, "strided_layout", None)
            if layout is not None and query.shape[2] == key.shape[2] == layout.length:
                return banded_sdpa(query, key, value, layout, dropout=dropout, scaling=scaling), None
            layout, step = getattr(attention_mask, "strided_step", (None, None))
            if layout is not None and (query.shape[2], key.shape[2]) == tuple(attention_mask.shape[-2:]):
                return banded_step_sdpa(query, key, value, layout, step, dropout=dropout, scaling=scaling), None
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    sdpa_with_strided_bands._ebft_banded = True
    sdpa_with_strided_bands._ebft_original = original
    AttentionInterface.register("sdpa", sdpa_with_strided_bands)


def _use_banded(device: torch.device) -> bool:
    if BANDED_SDPA == "always":
        return True
    return BANDED_SDPA == "cpu" and device.type == "cpu"


def band_plan(layout: StridedLayout, band_rows: int | None = None) -> list[tuple[int, int, torch.Tensor]]:
    """Bands of generated rows in block-major order ``(k, j, g)``: ``(rows, keys, mask)`` per band.

    A band holds the ``n*G`` rows of each of ``b`` consecutive blocks; its keys are the chunk prefix
    ``x[0 : C + k_last*s]`` followed by the band's own rows, and ``mask`` (1, 1, rows, keys) is
    ``layout.allowed`` restricted to them. Cached per layout and band size.
    """
    band_rows = band_rows or BAND_ROWS
    per_block = layout.num_samples * layout.gen_len
    blocks = max(1, round(band_rows / per_block))
    cache = _MASKS.setdefault(layout, {})
    key = ("bands", blocks)
    if key not in cache:
        order = layout.token_index.permute(1, 0, 2).reshape(-1)  # row index of (k, j, g), block-major
        plan = []
        for k0 in range(0, layout.num_blocks, blocks):
            k1 = min(layout.num_blocks, k0 + blocks)
            rows = order[k0 * per_block: k1 * per_block]
            end = int(layout.context_end[k1 - 1])
            keys = torch.cat([torch.arange(end, device=layout.device), rows])
            plan.append((len(rows), end, layout.allowed(rows, key_rows=keys)[None, None]))
        cache[key] = plan
    return cache[key]


def step_band_plan(layout: StridedLayout, step: int,
                   band_rows: int | None = None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Bands of the ``n*NB`` queries of KV-cached sampling step ``step`` in block-major order
    ``(k, j)``: ``(rows, key_index, mask)`` per band, keys = the chunk prefix of the band's last
    context plus the band's own rows of steps ``0..step`` (indices into the cache)."""
    band_rows = band_rows or BAND_ROWS
    n, NB, T = layout.num_samples, layout.num_blocks, layout.seq_len
    width = n * NB
    blocks = max(1, round(band_rows / (n * (step + 1))))
    cache = _MASKS.setdefault(layout, {})
    key = ("step_bands", blocks, step)
    if key not in cache:
        device = layout.device
        order = torch.arange(width, device=device).view(n, NB).t().reshape(-1)  # (k, j) -> j*NB + k
        plan = []
        for k0 in range(0, NB, blocks):
            k1 = min(NB, k0 + blocks)
            own = order[k0 * n: k1 * n]
            query_rows = T + step * width + own
            end = int(layout.context_end[k1 - 1])
            past = (T + torch.arange(step + 1, device=device)[:, None] * width + own[None, :]).reshape(-1)
            keys = torch.cat([torch.arange(end, device=device), past])
            plan.append((len(own), keys, layout.allowed(query_rows, key_rows=keys)[None, None]))
        cache[key] = plan
    return cache[key]


def banded_step_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: StridedLayout,
                     step: int, dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """Attention of sampling step ``step``: ``query`` (B, Hq, n*NB, d) against the KV cache
    ``key``/``value`` (B, Hkv, T + (step+1)*n*NB, d) -> (B, n*NB, Hq, d), equal to sdpa with
    ``step_mask`` but reading only the keys each band of blocks can see."""
    layout = layout.to(query.device)
    n, NB = layout.num_samples, layout.num_blocks
    rep = query.shape[1] // key.shape[1]
    gqa = {}
    if rep > 1:
        if query.device.type == "cpu":
            gqa = {"enable_gqa": True}
        else:
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    plan = step_band_plan(layout, step)
    queries = query.unflatten(2, (n, NB)).transpose(2, 3).flatten(2, 3).split([rows for rows, _, _ in plan], 2)
    outs = [F.scaled_dot_product_attention(q, key.index_select(2, keys), value.index_select(2, keys),
                                           attn_mask=mask, dropout_p=dropout, scale=scaling, **gqa)
            for (_, keys, mask), q in zip(plan, queries)]
    out = torch.cat(outs, 2).unflatten(2, (NB, n)).transpose(2, 3).flatten(2, 3)
    return out.transpose(1, 2).contiguous()


def _block_major(x: torch.Tensor, layout: StridedLayout) -> torch.Tensor:
    """Generated rows of ``x`` (B, H, L, d) from step-major ``(g, j, k)`` to block-major ``(k, j, g)``."""
    n, NB, G = layout.num_samples, layout.num_blocks, layout.gen_len
    gen = x[:, :, layout.seq_len:].unflatten(2, (G, n, NB))
    return gen.permute(0, 1, 4, 3, 2, 5).flatten(2, 4)


def _step_major(x: torch.Tensor, layout: StridedLayout) -> torch.Tensor:
    n, NB, G = layout.num_samples, layout.num_blocks, layout.gen_len
    return x.unflatten(2, (NB, n, G)).permute(0, 1, 4, 3, 2, 5).flatten(2, 4)


def banded_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: StridedLayout,
                dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """Strided-row attention without the masked work: ``query`` (B, Hq, L, d), ``key``/``value``
    (B, Hkv, L, d) over the whole row -> (B, L, Hq, d), equal to sdpa with the dense strided mask."""
    T = layout.seq_len
    layout = layout.to(query.device)
    rep = query.shape[1] // key.shape[1]
    gqa = {}
    if rep > 1:
        if query.device.type == "cpu":
            gqa = {"enable_gqa": True}
        else:  # fused GPU kernels take GQA only without a mask
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    kwargs = {"dropout_p": dropout, "scale": scaling, **gqa}
    chunk_out = F.scaled_dot_product_attention(query[:, :, :T], key[:, :, :T], value[:, :, :T], is_causal=True,
                                               **kwargs)
    plan = band_plan(layout)
    sizes = [rows for rows, _, _ in plan]
    k_chunk, v_chunk = key[:, :, :T], value[:, :, :T]
    outs = []
    for (rows, end, mask), q, k, v in zip(plan, _block_major(query, layout).split(sizes, 2),
                                          _block_major(key, layout).split(sizes, 2),
                                          _block_major(value, layout).split(sizes, 2)):
        k = torch.cat([k_chunk[:, :, :end], k], 2)
        v = torch.cat([v_chunk[:, :, :end], v], 2)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs))
    out = torch.cat([chunk_out, _step_major(torch.cat(outs, 2), layout)], 2)
    return out.transpose(1, 2).contiguous()
