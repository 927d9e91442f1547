"""The one held-out pipeline of training, evaluation and the RLVR reward: load the rows ``data`` names
-> split them into training and held-out rows (:func:`ebft.data.sources.train_val_split` with
``data.val_size`` and ``data.seed``: the same split everywhere) -> pack each side into chunks of
``task.seq_len`` tokens (:func:`ebft.data.packing.pack_rows`) or select its RLVR prompts
(:func:`ebft.data.prompts.select_prompts`), or leave it as rows.

Users: the chunk and prompt datamodules (training, validation CE), the evaluation runner and the
in-training calibration callback (held-out CE / CFM, translation pairs), and the verifiable reward of
a model on fixed prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebft.config import DataSettings, PromptSettings
from ebft.data.packing import PackedChunks, pack_rows
from ebft.data.prompts import select_prompts
from ebft.data.sources import load_rows, train_val_split

CHUNKS, PROMPTS = "chunks", "prompts"


@dataclass(frozen=True)
class Prompts:
    """Prompt rows (with what their verifier needs) and their token ids."""

    rows: list[dict]
    ids: list[list[int]]


@dataclass(frozen=True)
class Split:
    """Both sides of the split as rows, and each side in the form asked for (None: rows only)."""

    train_rows: list[dict]
    val_rows: list[dict]
    train: PackedChunks | Prompts | None = None
    val: PackedChunks | Prompts | None = None


def chunks_of(rows: list[dict], data: DataSettings, tokenizer, seq_len: int) -> PackedChunks:
    """One side's rows packed into chunks of ``seq_len`` tokens, as training packs them."""
    return pack_rows(rows, tokenizer, seq_len, chat_template=data.chat_template, packing=data.packing)


def prompts_of(rows: list[dict], data: DataSettings, tokenizer, prompts: PromptSettings) -> Prompts:
    """One side's RLVR prompts: the rows ``prompts`` keeps, and their token ids, as training selects them."""
    return Prompts(*select_prompts(list(rows), data.task, tokenizer, prompts.max_prompt_tokens,
                                   prompts.check_references, data.chat_template))


def split_data(data: DataSettings, tokenizer=None, seq_len: int | None = None, train: str | None = None,
               val: str | None = None, prompts: PromptSettings | None = None) -> Split:
    """Rows -> train/held-out split -> each side as ``chunks`` (packed into ``seq_len`` tokens), as
    ``prompts`` (selected with ``prompts``) or None (rows only); see the module docstring."""
    train_rows, val_rows = train_val_split(load_rows(data.source, data.task), data.val_size, data.seed)

    def form(rows: list[dict], kind: str | None):
        if kind == CHUNKS:
            return chunks_of(rows, data, tokenizer, seq_len)
        if kind == PROMPTS:
            return prompts_of(rows, data, tokenizer, prompts)
        if kind is not None:
            raise ValueError(f"form {kind!r} is not one of {CHUNKS}, {PROMPTS} or None")
        return None

    return Split(train_rows, val_rows, form(train_rows, train), form(val_rows, val))
