"""Pack rows into fixed T-token chunks, as the paper's authors do.

A row's segments (``ebft.data.formats.row_segments``: question and answer, or
the turns of a chat) are tokenised separately without special tokens and
joined with no template (with ``data.chat_template=true`` the segments are the
tokenizer's chat template rendering); every example starts with the special
tokens the tokenizer itself puts before a text (``leading_special_ids``: a BOS
for Llama-3.2, none for SmolLM2; with a chat template, what the template
writes) and is followed by one EOS token; the token stream of all examples is cut into chunks of exactly T tokens
and the last partial chunk is dropped. There is no padding, so every token of a
chunk is a real token of the stream. Contexts cross example boundaries. With
``data.packing=examples`` every chunk starts at an example's first token instead
(what an example has after a chunk's end is skipped).

Per chunk there is also an answer mask (True on answer tokens, i.e. completions
and assistant turns, and on the EOS that ends each example, so a model trained
on answers learns to stop; False on question / prompt tokens), the mask of each
example's last answer (its last run of answer tokens: the last assistant turn
and the EOS), the document id of every token (the index of its row) and its
position in its example (0 on the example's first token, wherever the chunk
starts: a chunk whose first token has a position > 0 continues an example of
the previous chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import chain

import numpy as np
import torch

from ebft.config import PACKING, DataConfigError
from ebft.data.formats import row_segments

TOKENIZE_BATCH = 1024


@dataclass
class PackedChunks:
    """``input_ids`` (N, T) long, ``answer_mask`` (N, T) bool, ``doc_ids`` (N, T) long (row index),
    ``doc_pos`` (N, T) long (position in the example), ``last_answer_mask`` (N, T) bool (the example's
    last answer)."""

    input_ids: torch.Tensor
    answer_mask: torch.Tensor
    doc_ids: torch.Tensor
    doc_pos: torch.Tensor
    last_answer_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> PackedChunks:
        """The chunks at ``index`` (a long tensor), every field alike."""
        return PackedChunks(*(getattr(self, f.name)[index] for f in fields(self)))

    def item(self, i: int) -> dict[str, torch.Tensor]:
        """Chunk ``i`` as a training item: every field by name."""
        return {f.name: getattr(self, f.name)[i] for f in fields(self)}


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by its own convention: Llama-3.2's BOS
    ``<|begin_of_text|>``; nothing for SmolLM2 or Qwen2.5. Every document (an example of the
    chunks, a prompt) starts with them, as the model saw text in pretraining."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _pack_batch(rows: list[dict], first_doc: int, tokenizer, eos: int,
                chat_template: bool) -> tuple[np.ndarray, ...]:
    """Stream tokens, answer mask, document ids, positions in the document and last-answer mask of
    consecutive rows."""
    segments = [row_segments(r, tokenizer, chat_template) for r in rows]
    encoded = iter(_encode(tokenizer, [text for segs in segments for text, _ in segs]))
    lead = () if chat_template else tuple(leading_special_ids(tokenizer))
    pieces, answer, row_len = [], [], []
    for segs in segments:
        start = len(pieces)
        if lead:
            pieces.append(lead)
            answer.append(False)
        for _, is_answer in segs:
            pieces.append(next(encoded))
            answer.append(is_answer)
        pieces.append((eos,))
        answer.append(True)
        row_len.append(sum(map(len, pieces[start:])))
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    tokens = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))
    mask = np.repeat(np.array(answer, dtype=bool), lengths)
    local = np.repeat(np.arange(len(rows)), row_len)
    index = np.arange(len(tokens))
    positions = index - (np.cumsum(row_len) - row_len)[local]
    last_prompt = np.full(len(rows), -1)
    np.maximum.at(last_prompt, local[~mask], index[~mask])
    return tokens, mask, local + first_doc, positions, mask & (index > last_prompt[local])


def example_chunk_starts(doc_pos: np.ndarray, seq_len: int) -> np.ndarray:
    """Where the chunks of ``packing=examples`` start in a stream whose tokens have the positions
    ``doc_pos`` in their examples: at an example's first token, the first at the stream's start and each
    next one at the first example start at or after the previous chunk's end (what is left of the example
    the previous chunk cut is skipped); a chunk never runs past the stream."""
    out, end = [], 0
    for start in np.flatnonzero(doc_pos == 0).tolist():
        if start >= end and start + seq_len <= len(doc_pos):
            out.append(start)
            end = start + seq_len
    return np.array(out, dtype=np.int64)


def pack_rows(rows: list[dict], tokenizer, seq_len: int, max_chunks: int | None = None,
              chat_template: bool = False, packing: str = "stream") -> PackedChunks:
    """Tokenise ``rows`` in batches and pack them into ``seq_len``-token chunks
    (at most ``max_chunks``; tokenising stops once enough tokens exist for the stream's chunks).

    ``packing``: ``stream`` cuts the token stream every ``seq_len`` tokens (the paper's; a chunk may start
    inside an example); ``examples`` starts every chunk at an example's first token
    (:func:`example_chunk_starts`), so every example that starts in a chunk has its whole prompt there
    (answer anchors lose no block to a prompt left in the previous chunk), at the cost of the tokens an
    example has after a chunk's end."""
    if packing not in PACKING:
        raise DataConfigError(f"data.packing={packing!r} is not one of {', '.join(PACKING)}")
    if seq_len < 1:
        raise DataConfigError(f"task.seq_len={seq_len} must be a positive number of tokens")
    if max_chunks is not None and max_chunks < 1:
        raise DataConfigError(f"max_chunks={max_chunks} must be at least 1 (or None for all chunks)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataConfigError(
            "the tokenizer has no EOS token to separate examples; use a model whose tokenizer has one")
    needed = None if max_chunks is None else max_chunks * seq_len
    parts, have = [], 0
    for start in range(0, len(rows), TOKENIZE_BATCH):
        part = _pack_batch(rows[start:start + TOKENIZE_BATCH], start, tokenizer, eos, chat_template)
        parts.append(part)
        have += len(part[0])
        if needed is not None and have >= needed:
            break
    stream = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    if packing == "stream":
        n_chunks = have // seq_len if max_chunks is None else min(have // seq_len, max_chunks)
        chunks = [field[:n_chunks * seq_len].reshape(n_chunks, seq_len) for field in stream]
    else:
        starts = example_chunk_starts(stream[3], seq_len)[:max_chunks]
        n_chunks = len(starts)
        chunks = [field[starts[:, None] + np.arange(seq_len)] for field in stream]
    if n_chunks == 0:
        raise DataConfigError(
            f"T={seq_len} is longer than all the data ({have} tokens from {len(rows)} rows"
            f"{'' if packing == 'stream' else ' from any example start'}): lower task.seq_len or add data")
    return PackedChunks(*(torch.from_numpy(field) for field in chunks))
