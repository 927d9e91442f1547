"""Packing rows into T-token chunks with the real (SmolLM2) tokenizer."""

import copy

import pytest
import torch

from ebft.config import DataConfigError
from ebft.data import packing
from ebft.data.packing import leading_special_ids, pack_rows

ROWS = [
    {"question": "def add(a, b):\n", "answer": "    return a + b\n"},
    {"question": "Translate this from English to German:\nEnglish: Yes\nGerman:", "answer": " Ja"},
    {"question": "", "answer": "import os\nprint(os.sep)\n"},
    {"question": "Write a function that squares x.\n", "answer": "def sq(x):\n    return x * x\n"},
]


def _stream(rows, tokenizer):
    """The token stream, answer mask and document ids built one row at a time."""
    tokens, mask, docs = [], [], []
    for i, row in enumerate(rows):
        q = tokenizer.encode(row["question"], add_special_tokens=False)
        a = tokenizer.encode(row["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
        tokens += q + a
        mask += [False] * len(q) + [True] * len(a)
        docs += [i] * (len(q) + len(a))
    return tokens, mask, docs


def test_chunks_are_the_stream_prefix_and_remainder_is_dropped(tokenizer):
    tokens, mask, docs = _stream(ROWS, tokenizer)
    seq_len = 10
    assert len(tokens) % seq_len, "choose T so that a remainder exists"
    packed = pack_rows(ROWS, tokenizer, seq_len)
    n = len(tokens) // seq_len
    assert packed.input_ids.shape == (n, seq_len) and len(packed) == n
    assert packed.input_ids.dtype == torch.long and packed.answer_mask.dtype == torch.bool
    assert packed.input_ids.flatten().tolist() == tokens[:n * seq_len]
    assert packed.answer_mask.flatten().tolist() == mask[:n * seq_len]
    assert packed.doc_ids.flatten().tolist() == docs[:n * seq_len]


def test_no_extra_or_pad_token_is_ever_a_target(tokenizer):
    tokens, _, _ = _stream(ROWS, tokenizer)
    packed = pack_rows(ROWS, tokenizer, len(tokens))
    ids = packed.input_ids[0]
    eos_positions = (ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
    ends = (packed.doc_ids[0][1:] != packed.doc_ids[0][:-1]).nonzero().flatten().tolist() + [len(tokens) - 1]
    assert eos_positions == ends
    assert tokenizer.bos_token_id not in ids.tolist()


def test_answer_mask_decodes_to_the_answers(tokenizer):
    tokens, _, _ = _stream(ROWS, tokenizer)
    packed = pack_rows(ROWS, tokenizer, len(tokens))
    ids, mask = packed.input_ids[0], packed.answer_mask[0]
    eos = ids == tokenizer.eos_token_id
    assert tokenizer.decode(ids[mask & ~eos]) == "".join(r["answer"] for r in ROWS)
    assert tokenizer.decode(ids[~mask]) == "".join(r["question"] for r in ROWS)
    assert mask[eos].all()


def test_batched_tokenisation_and_max_chunks_match_the_full_packing(tokenizer, monkeypatch):
    rows = ROWS * 5
    full = pack_rows(rows, tokenizer, 16)
    monkeypatch.setattr(packing, "TOKENIZE_BATCH", 3)
    batched = pack_rows(rows, tokenizer, 16)
    for name in ("input_ids", "answer_mask", "doc_ids"):
        assert torch.equal(getattr(batched, name), getattr(full, name)), name
    first = pack_rows(rows, tokenizer, 16, max_chunks=2)
    assert torch.equal(first.input_ids, full.input_ids[:2]) and torch.equal(first.doc_ids, full.doc_ids[:2])


def test_too_long_seq_len_is_a_clear_error(tokenizer):
    with pytest.raises(DataConfigError, match=r"T=4096 is longer than all the data.*lower task.seq_len or add data"):
        pack_rows(ROWS, tokenizer, 4096)
    with pytest.raises(DataConfigError, match="max_chunks=0"):
        pack_rows(ROWS, tokenizer, 4, max_chunks=0)


@pytest.fixture
def bos_tokenizer(tokenizer):
    """SmolLM2's tokenizer made to follow a Llama-3.2-like convention: it puts its BOS before every text."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def test_every_example_and_prompt_starts_as_the_tokenizer_starts_a_text(tokenizer, bos_tokenizer):
    from ebft.eval.generation import left_padded

    bos = bos_tokenizer.bos_token_id
    assert leading_special_ids(tokenizer) == [] and leading_special_ids(bos_tokenizer) == [bos]
    tokens, mask, docs = _stream(ROWS, tokenizer)
    packed = pack_rows(ROWS, bos_tokenizer, len(tokens) + len(ROWS))
    starts = [0] + [i + 1 for i, t in enumerate(tokens) if t == tokenizer.eos_token_id][:-1]
    expected = list(tokens)
    for shift, start in enumerate(starts):
        expected.insert(start + shift, bos)
    assert packed.input_ids[0].tolist() == expected
    assert not packed.answer_mask[0][packed.input_ids[0] == bos].any()
    prompts = ["x = 1", "def f(a, b):"]
    ids, attention = left_padded(bos_tokenizer, prompts, torch.device("cpu"))
    for row, mask_row, prompt in zip(ids, attention, prompts):
        assert row[mask_row == 1].tolist() == [bos, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def test_example_packing_starts_every_chunk_at_an_example(tokenizer):
    rows = ROWS * 3
    stream = pack_rows(rows, tokenizer, 1)
    T = 12
    chunks = pack_rows(rows, tokenizer, T, packing="examples")
    starts = [int(i) for i in torch.nonzero(stream.doc_pos[:, 0] == 0).flatten()]
    assert (chunks.doc_pos[:, 0] == 0).all()
    # greedy: each chunk is the stream from an example start, the next from the first start after its end
    expected, end = [], 0
    for s in starts:
        if s >= end and s + T <= len(stream):
            expected.append(s)
            end = s + T
    assert len(chunks) == len(expected)
    for c, s in enumerate(expected):
        for name in ("input_ids", "answer_mask", "doc_ids", "doc_pos", "last_answer_mask"):
            assert torch.equal(getattr(chunks, name)[c], getattr(stream, name)[s:s + T, 0]), name
    assert pack_rows(rows, tokenizer, T, packing="examples", max_chunks=2).input_ids.shape == (2, T)
    with pytest.raises(DataConfigError, match="data.packing='docs'"):
        pack_rows(rows, tokenizer, T, packing="docs")
