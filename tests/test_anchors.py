"""Answer anchors (``ebft.core.anchors``): which blocks of hand-worked packed chunks are used, what each
used context holds, and that no used rollout starts in a prompt; the packing fields they read.

Geometry of the hand-worked chunks: T=16, C=s=G=2, so NB=7 blocks with contexts x[0:e], e = 2, 4, ..., 14,
and ground truth x[e:e+2].
"""

import random

import pytest
import torch

from ebft.core.anchors import anchored_blocks, answer_span_start, answer_tokens, block_used
from ebft.core.layout import StridedLayout
from ebft.data.packing import pack_rows

LAYOUT = StridedLayout(16, 2, 2, 2, 1)
T_ = torch.tensor


def chunk(pieces: list[tuple[int, int, bool]], first_pos: int = 0) -> dict[str, torch.Tensor]:
    """Fields of one chunk (batch 1) from ``(document, tokens, is_answer)`` pieces in stream order; the
    chunk's first document starts at position ``first_pos`` (> 0: it began in the previous chunk)."""
    answer, docs, pos = [], [], []
    for doc, count, is_answer in pieces:
        start = (pos[-1] + 1 if docs and docs[-1] == doc else (first_pos if not docs else 0))
        answer += [is_answer] * count
        docs += [doc] * count
        pos += list(range(start, start + count))
    assert len(answer) == 16
    return {"answer_mask": T_([answer]), "doc_ids": T_([docs]), "doc_pos": T_([pos])}


# two examples: prompt 3 + answer 4 (with its EOS); prompt 5 + answer 4
TWO = chunk([(0, 3, False), (0, 4, True), (1, 5, False), (1, 4, True)])
# the tail of an example begun in the previous chunk (its answer, positions 9..12), then one that
# runs past the chunk's end: prompt 4, answer 8 (no EOS in this chunk)
SPLIT = chunk([(5, 4, True), (6, 4, False), (6, 8, True)], first_pos=9)
# a chat of three exchanges: user 3, assistant 3, user 2, assistant 3, user 2, assistant 2 + EOS
CHAT = chunk([(0, 3, False), (0, 3, True), (0, 2, False), (0, 3, True), (0, 2, False), (0, 3, True)])
CHAT_LAST = {**CHAT, "last_answer_mask": CHAT["answer_mask"] & (torch.arange(16) >= 13)}


def used(fields, prefix=0, mask="answer_mask"):
    return block_used(LAYOUT, fields[mask], fields["doc_ids"], fields["doc_pos"], prefix)[0].int().tolist()


def test_two_examples_in_one_chunk():
    # k: 0 gt[2,3] starts in ex0's prompt; 1 gt[4,5] in ex0's answer (one answer token before it);
    # 2 gt[6,7] crosses into ex1; 3, 4 ex1's prompt; 5 gt[12,13] starts exactly at ex1's answer; 6 gt[14,15]
    assert used(TWO) == [0, 1, 0, 0, 0, 1, 1]
    # min_answer_prefix = 2: the context must already hold 2 answer tokens (block 6: 14 - 12 = 2)
    assert used(TWO, prefix=2) == [0, 0, 0, 0, 0, 0, 1]
    assert used(TWO, prefix=3) == [0] * 7


def test_an_example_split_across_chunks():
    # block 0 lies in an answer whose prompt fell into the previous chunk: dropped; blocks 1-2 are ex6's
    # prompt; 3-6 its answer, which runs past the chunk's end (its ground truth is inside the chunk)
    assert used(SPLIT) == [0, 0, 0, 1, 1, 1, 1]


def test_a_chat_with_three_turns():
    # every assistant turn is an answer: block 1 (turn 1), block 3 (turn 2 from its first token), block 6
    # (turn 3 after one token); blocks 4, 5 cross a user turn
    assert used(CHAT) == [0, 1, 0, 1, 0, 0, 1]
    assert used(CHAT_LAST, mask="last_answer_mask") == [0, 0, 0, 0, 0, 0, 1]
    assert anchored_blocks(LAYOUT, CHAT_LAST, "answer", answer_turns="last")[0].int().tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert anchored_blocks(LAYOUT, CHAT_LAST, "all") is None


def test_what_each_used_context_holds():
    """A used block's context is the whole chunk prefix x[0:e]: it holds its example's whole prompt (every
    earlier turn of a chat) and the answer tokens before e; its rollout replaces answer tokens only."""
    for fields in (TWO, SPLIT, CHAT):
        answer, docs, pos = fields["answer_mask"][0], fields["doc_ids"][0], fields["doc_pos"][0]
        for k in torch.nonzero(block_used(LAYOUT, answer[None], docs[None], pos[None])[0]).flatten().tolist():
            e = int(LAYOUT.context_end[k])
            gt = slice(e, e + LAYOUT.gen_len)
            doc = int(docs[e])
            assert answer[gt].all() and (docs[gt] == doc).all()         # no used rollout starts in a prompt
            first = int((docs == doc).nonzero()[0])
            assert pos[first] == 0 and first < e                       # the example starts in the context
            assert not answer[first:e].all()                            # ... with its prompt
    # block 3 of the chat: context x[0:8] = user 1, assistant 1, user 2 (the earlier turns)
    assert CHAT["answer_mask"][0][:8].int().tolist() == [0, 0, 0, 1, 1, 1, 0, 0]


def test_answer_spans_break_at_documents():
    # text data: everything is answer, spans restart at each example
    answer = torch.ones(1, 6, dtype=torch.bool)
    docs = T_([[0, 0, 1, 1, 1, 2]])
    assert answer_span_start(answer, docs).tolist() == [[0, 0, 2, 2, 2, 5]]
    assert answer_span_start(T_([[False, True, True, False, True]]), T_([[0] * 5])).tolist() == [[-1, 1, 1, 1, 4]]


def slow_block_used(answer, docs, pos, layout, prefix):
    """The rule written out per block with Python loops (module docstring of ebft.core.anchors)."""
    out = []
    for e in layout.context_end.tolist():
        gt = range(e, e + layout.gen_len)
        doc = docs[e]
        ok = all(answer[t] and docs[t] == doc for t in gt)
        start = e                                                      # the answer span's first token
        while ok and start > 0 and answer[start - 1] and docs[start - 1] == doc:
            start -= 1
        first = e + layout.gen_len - 1 - pos[e + layout.gen_len - 1]  # the example's first token
        out.append(ok and e - start >= prefix and 0 <= first <= e - 1)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_packed_streams_match_the_slow_rule(seed):
    rng = random.Random(seed)
    layout = StridedLayout(24, rng.choice([1, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 4]), 1)
    answer, docs, pos, doc = [], [], [], 0
    while len(answer) < 5 * 24:
        turns = rng.choice([1, 1, 2, 3])
        p = 0
        for _ in range(turns):
            for count, is_answer in ((rng.randint(0, 4), False), (rng.randint(1, 6), True)):
                answer += [is_answer] * count
                docs += [doc] * count
                pos += range(p, p + count)
                p += count
        doc += 1
    rows = [(answer[i:i + 24], docs[i:i + 24], pos[i:i + 24]) for i in range(0, 5 * 24, 24)]
    batch = [T_(list(x)) for x in zip(*rows)]
    prefix = rng.choice([0, 1, 2])
    got = block_used(layout, batch[0].bool(), batch[1], batch[2], prefix)
    for b, (a, d, p) in enumerate(rows):
        assert got[b].tolist() == slow_block_used(a, d, p, layout, prefix), (b, a, d, p)


def test_packing_gives_positions_and_last_answers(tokenizer):
    rows = [{"question": "def add(a, b):\n", "answer": "    return a + b\n"},
            {"question": "", "answer": "import os\n"},
            {"question": "hi", "answer": "ok", "messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo there"},
                {"role": "user", "content": "and"}, {"role": "assistant", "content": "ok"}]}]
    stream = pack_rows(rows, tokenizer, 1)
    docs, pos = stream.doc_ids[:, 0], stream.doc_pos[:, 0]
    for d in range(3):
        assert pos[docs == d].tolist() == list(range(int((docs == d).sum())))
    answer, last = stream.answer_mask[:, 0], stream.last_answer_mask[:, 0]
    assert torch.equal(last[docs < 2], answer[docs < 2])               # one answer: the last one
    chat_ids = stream.input_ids[:, 0][docs == 2]
    assert tokenizer.decode(chat_ids[last[docs == 2]]) == "ok" + tokenizer.eos_token
    assert tokenizer.decode(chat_ids[answer[docs == 2]]) == "yo thereok" + tokenizer.eos_token
    # the chunk that starts inside an example knows it: its first token's position is > 0
    chunks = pack_rows(rows, tokenizer, 5)
    assert chunks.doc_pos[1, 0] == 5 and chunks.doc_pos[0, 0] == 0


CHAT_ROW = {"question": "", "answer": "", "messages": [
    {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple, a round fruit."},
    {"role": "user", "content": "And a colour?"}, {"role": "assistant", "content": "Green, like the grass."},
    {"role": "user", "content": "A number?"}, {"role": "assistant", "content": "Seven, which is a prime."}]}


@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize("turns", ["all", "last"])
def test_packed_chat_turns_are_answers_with_the_earlier_turns_in_context(tokenizer, chat_template, turns):
    """A packed three-exchange chat (raw or through the tokenizer's chat template): every used block's
    ground truth lies in one assistant turn (each turn has used blocks; only the last with
    answer_turns=last), and its context holds every earlier turn."""
    first = pack_rows([CHAT_ROW], tokenizer, 1, chat_template=chat_template)
    total = len(first)                                                   # the chat's tokens, one per "chunk"
    chunk = pack_rows([CHAT_ROW, CHAT_ROW], tokenizer, total, chat_template=chat_template).select(T_([0]))
    layout = StridedLayout(total, 1, 1, 2, 1)
    used = anchored_blocks(layout, vars(chunk), "answer", answer_turns=turns)[0]
    ids, answer = chunk.input_ids[0], chunk.answer_mask[0]
    span = answer_span_start(answer[None], chunk.doc_ids)[0]
    assistant = [t["content"] for t in CHAT_ROW["messages"] if t["role"] == "assistant"]
    spans = sorted({int(span[t]) for t in range(total) if answer[t]})
    assert len(spans) == 3
    by_turn = {s: [] for s in spans}
    for k in torch.nonzero(used).flatten().tolist():
        e = int(layout.context_end[k])
        assert answer[e:e + 2].all() and span[e + 1] <= e                  # in one assistant turn
        turn = spans.index(int(span[e]))
        by_turn[spans[turn]].append(k)
        context = tokenizer.decode(ids[:e])
        for earlier in range(turn):                                          # every earlier exchange
            assert assistant[earlier] in context
        assert CHAT_ROW["messages"][2 * turn]["content"] in context          # and this turn's question
    expected = [True, True, True] if turns == "all" else [False, False, True]
    assert [bool(by_turn[s]) for s in spans] == expected
    assert tokenizer.decode(ids[span == spans[2]]).startswith(assistant[2])
    # the CE of answer anchors counts the same answers (ebft.methods.ebft: answer_tokens)
    counted = answer_tokens(vars(chunk), turns)[0]
    assert torch.equal(counted, answer if turns == "all" else answer & (span == spans[2]))
