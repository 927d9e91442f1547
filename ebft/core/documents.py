"""Document masking (``data.document_mask``): each example of a packed chunk attends only to itself.

A chunk ``x[0:T]`` holds several examples (documents; ``doc_ids`` gives each token's). With document
masking the chunk's rows are split into segments, the maximal runs of one document (the first segment may
be the tail of an example begun in the previous chunk), and

- a chunk row attends to the earlier rows of its own segment only, and its position id is its offset in
  the segment, ``t - start(t)`` (positions restart at every example);
- a generated row ``(j, k, g)`` belongs to the segment of its context's last token ``e_k - 1``
  (``e_k = C + k*s``): it attends to the rows of that segment before ``e_k`` and to its own earlier
  steps, at position ``(e_k - 1 - start(e_k - 1)) + 1 + g``.

That is the strided rule of ``StridedLayout.allowed`` AND "same segment"::

    allowed_b[q, kv] = layout.allowed[q, kv]  and  segment[b, q] == segment[b, kv]

so every context ``x[0 : e_k]`` is cut to its example's part ``x[start : e_k]``, and the strided pass
gives, row for row, what running each example alone (from position 0) would give. Unlike the layout's
own mask this one depends on the batch: it is built per batch (``ebft.core.masks.document_mask``),
never cached. Without document masking nothing here is used and the strided pass is unchanged.
"""

from __future__ import annotations

import torch

from ebft.core.layout import StridedLayout


def chunk_segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(segment, position)`` (B, T) of chunks' document ids (B, T): the index of each token's segment (a
    run of one document) within its chunk, and its offset in the segment."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}; expected (batch, T)")
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return starts.long().cumsum(dim=1) - 1, index - first


def causal_document_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain causal pass over chunks with document masking: the bool mask (B, 1, T, T) (True = may
    attend: an earlier or the same row of the same segment) and the position ids (B, T)."""
    segment, position = chunk_segments(doc_ids)
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (segment[:, :, None] == segment[:, None, :]))[:, None], position


class StridedDocuments:
    """The segment and position id of every row of a batch's strided rows (module docstring), on the
    device of ``doc_ids`` (B, T)."""

    def __init__(self, layout: StridedLayout, doc_ids: torch.Tensor):
        if doc_ids.dim() != 2 or doc_ids.shape[1] != layout.seq_len:
            raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}; expected (batch, T={layout.seq_len})")
        self.layout = layout = layout.to(doc_ids.device)
        segment, position = chunk_segments(doc_ids)
        last = layout.context_end - 1                                   # each block's last context row
        n, NB, G = layout.num_samples, layout.num_blocks, layout.gen_len
        gen_segment = segment[:, last].view(-1, 1, NB, 1).expand(-1, n, NB, G)
        gen_position = position[:, last].view(-1, 1, NB, 1) + 1 + torch.arange(G, device=doc_ids.device)
        self.segment = layout.grid_to_rows(gen_segment)                 # (B, length)
        self.segment[:, : layout.seq_len] = segment
        self.position_ids = layout.grid_to_rows(gen_position.expand(-1, n, NB, G))
        self.position_ids[:, : layout.seq_len] = position

    @property
    def batch_size(self) -> int:
        return self.segment.shape[0]

    def allowed(self, query_rows: slice | torch.Tensor | None = None, num_keys: int | None = None) -> torch.Tensor:
        """Bool (B, Q, K): ``layout.allowed(query_rows, num_keys)`` and query and key in one segment."""
        layout = self.layout
        rows = torch.arange(layout.length, device=layout.device)
        q = rows if query_rows is None else rows[query_rows]
        keys = layout.length if num_keys is None else num_keys
        same = self.segment[:, q, None] == self.segment[:, None, :keys]
        return layout.allowed(query_rows, num_keys)[None] & same
