"""Which blocks of a chunk are trained on or scored: ``method.anchors`` (``eval.anchors`` in evaluation).

With ``anchors=all`` (the paper's, §3 and appendix F) every block ``k`` of the strided layout is used: an
anchor every ``s`` tokens of packed text, wherever it falls. With ``anchors=answer`` block ``k``, with
context ``x[0 : e]`` (``e = C + k*s``) and ground truth ``x[e : e + G]``, is used only if

1. its ``G`` ground-truth tokens lie in ONE answer span: a maximal run of answer tokens of one example
   (a completion and its EOS, or one assistant turn of a chat; with ``answer_turns=last`` only the
   example's last run counts as answer);
2. at least ``min_answer_prefix`` tokens of that span come before it: ``e - span_start >= min_answer_prefix``;
3. its context holds the example's whole prompt: the example starts inside the chunk, at an index
   ``doc_start = t - doc_pos[t] >= 0``, and before ``e`` (``doc_start <= e - 1``: the context holds at
   least one token of the example).

Blocks whose example started in the previous chunk are dropped; the block grid and the tensor shapes
never change. The result is a boolean ``block_used`` ``(B, NB)`` on the fixed block grid; callers zero
what unused blocks would contribute (rewards, advantages, policy-gradient weight, metrics).

What dropping costs depends on how long examples are against T. Measured on the embedded Q&A code (3,000
standard-library functions, SmolLM2's tokenizer, C = s = G = 8): with the paper's packing
(``data.packing=stream``) 8.8% of the blocks are used at T = 128 and 44.1% at T = 1024, where 57.4% lie in
an answer span: the dropped blocks are 85% and 23% of those. Chunks cut at example boundaries
(``data.packing=examples``: every chunk starts at an example) use 35.6% (T = 128) and 53.9% (T = 1024) of
their blocks, with 55% and 15% fewer chunks for the same rows and more answer blocks in all (9,355 against
5,191 at T = 128; 28,596 against 27,397 at T = 1024).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ebft.config import ANCHORS, ANSWER_TURNS
from ebft.core.layout import StridedLayout


def answer_span_start(answer_mask: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Index (B, T) of the first token of the answer span holding each token (a run of answer tokens of
    one document within the chunk); -1 before the chunk's first answer token. Only meaningful where
    ``answer_mask`` is True."""
    if answer_mask.shape != doc_ids.shape or answer_mask.dim() != 2:
        raise ValueError(f"answer_mask {tuple(answer_mask.shape)} and doc_ids {tuple(doc_ids.shape)} must both be "
                         "(batch, T)")
    answer = answer_mask.bool()
    index = torch.arange(answer.shape[1], device=answer.device).expand_as(answer)
    continues = torch.zeros_like(answer)
    continues[:, 1:] = answer[:, :-1] & (doc_ids[:, 1:] == doc_ids[:, :-1])
    starts = answer & ~continues
    return torch.where(starts, index, torch.full_like(index, -1)).cummax(dim=1).values


def block_used(layout: StridedLayout, answer_mask: torch.Tensor, doc_ids: torch.Tensor, doc_pos: torch.Tensor,
               min_answer_prefix: int = 0) -> torch.Tensor:
    """``(B, NB)`` bool: block k of chunk b is an answer block (conditions 1-3 of the module docstring).

    ``answer_mask`` (B, T): the answer tokens (the example's last answer only, for ``answer_turns=last``);
    ``doc_ids`` (B, T): the example of every token; ``doc_pos`` (B, T): its position in the example.
    """
    if doc_pos.shape != doc_ids.shape or doc_ids.shape[-1] != layout.seq_len:
        raise ValueError(f"answer_mask, doc_ids and doc_pos must be (batch, T={layout.seq_len}); got "
                         f"{tuple(answer_mask.shape)}, {tuple(doc_ids.shape)}, {tuple(doc_pos.shape)}")
    if min_answer_prefix < 0:
        raise ValueError(f"min_answer_prefix={min_answer_prefix} must be >= 0")
    layout = layout.to(answer_mask.device)
    span = answer_span_start(answer_mask, doc_ids)
    end = layout.context_end                                   # e_k = C + k*s, (NB,)
    last = layout.gt_index[:, -1]                              # e_k + G - 1, the last ground-truth token
    doc_start = last - doc_pos[:, last]                        # chunk index of the example's first token
    return (answer_mask.bool()[:, last]                        # 1. the last ground-truth token is answer and
            & (span[:, last] >= 0) & (end - span[:, last] >= min_answer_prefix)  # its span starts >= prefix before e
            & (doc_start >= 0) & (doc_start <= end - 1))       # 3. the example starts in the chunk, before e


def answer_tokens(chunks: Mapping[str, torch.Tensor], answer_turns: str = "all") -> torch.Tensor:
    """The answer mask (B, T) of ``chunks`` (a batch's fields by name, as ``ebft.data.packing.PackedChunks``
    holds them): every answer (``answer_mask``), or each example's last one (``last_answer_mask``) for
    ``answer_turns=last``."""
    if answer_turns not in ANSWER_TURNS:
        raise ValueError(f"answer_turns={answer_turns!r} is not one of {ANSWER_TURNS}")
    return chunks["last_answer_mask" if answer_turns == "last" else "answer_mask"]


def anchored_blocks(layout: StridedLayout, chunks: Mapping[str, torch.Tensor], anchors: str = "all",
                    min_answer_prefix: int = 0, answer_turns: str = "all") -> torch.Tensor | None:
    """The blocks (B, NB) of ``chunks`` that ``anchors`` uses: None for ``all`` (every block), else
    :func:`block_used` of the answers ``answer_turns`` picks. Chunks longer than the layout's T (the FM
    profile's cut layouts) are read up to T."""
    if anchors not in ANCHORS:
        raise ValueError(f"anchors={anchors!r} is not one of {ANCHORS}")
    if anchors == "all":
        return None
    T = layout.seq_len
    return block_used(layout, answer_tokens(chunks, answer_turns)[:, :T], chunks["doc_ids"][:, :T],
                      chunks["doc_pos"][:, :T], min_answer_prefix)
