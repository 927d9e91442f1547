"""Document masking (``ebft.core.documents``): hand-worked segments, positions and mask; and, on a tiny
model, the strided pass, the KV-cached sampler and the feature network over chunks of two examples give
what running each example alone gives: hidden states and log-probs, the sampled tokens under the same
random numbers, and the feature vectors."""

import pytest
import torch

from ebft.core.compat import backbone_forward, lm_head
from ebft.core.documents import StridedDocuments, causal_document_mask, chunk_segments
from ebft.core.layout import StridedLayout
from ebft.core.masks import causal_chunk_mask, document_mask, step_mask
from ebft.core.strided import strided_hidden
from ebft.models.features import FeatureNetwork
from ebft.models.loading import build_tiny_model, flex_available
from ebft.objectives.losses import token_logprobs
from ebft.rollout.sampler import sample_from_logits, sample_strided
from tests.test_layout import slow_allowed

T_ = torch.tensor


def test_hand_worked_segments_positions_and_rows():
    # T=8, C=s=G=2, n=1: NB=3, contexts x[0:2], x[0:4], x[0:6]; examples x[0:3] and x[3:8]
    layout = StridedLayout(8, 2, 2, 2, 1)
    docs = StridedDocuments(layout, T_([[7, 7, 7, 9, 9, 9, 9, 9]]))
    # generated rows 8, 9, 10 = step 0 of blocks 0, 1, 2; rows 11, 12, 13 = step 1. Block 0's context ends
    # in example 0 at position 1; blocks 1 and 2 in example 1 at positions 0 and 2.
    assert docs.segment.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1]]
    assert docs.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 2, 1, 3, 3, 2, 4]]
    allowed = docs.allowed()[0]
    assert torch.nonzero(allowed[9]).flatten().tolist() == [3, 9]            # block 1: x[3:4] and itself
    assert torch.nonzero(allowed[12]).flatten().tolist() == [3, 9, 12]
    assert torch.nonzero(allowed[10]).flatten().tolist() == [3, 4, 5, 10]   # block 2: x[3:6]
    assert torch.nonzero(allowed[8]).flatten().tolist() == [0, 1, 8]        # block 0: x[0:2]
    assert torch.nonzero(allowed[4]).flatten().tolist() == [3, 4]           # a chunk row: its example only


def slow_document_allowed(layout: StridedLayout, doc_ids: list[int]) -> torch.Tensor:
    """The strided rule AND 'same example', with loops: a generated row's example is that of its
    context's last token."""
    base = slow_allowed(layout)
    owner = {t: doc_ids[t] for t in range(layout.seq_len)}
    for j in range(layout.num_samples):
        for k in range(layout.num_blocks):
            for g in range(layout.gen_len):
                owner[int(layout.token_index[j, k, g])] = doc_ids[int(layout.context_end[k]) - 1]
    same = torch.tensor([[owner[q] == owner[kv] for kv in range(layout.length)] for q in range(layout.length)])
    return base & same


@pytest.mark.parametrize("geometry,doc_ids", [((12, 3, 2, 2, 2), [0] * 4 + [1] * 5 + [2] * 3),
                                              ((10, 1, 3, 3, 1), [5] * 10),
                                              ((9, 2, 1, 1, 3), [0, 1, 1, 2, 2, 2, 3, 3, 3])])
def test_document_mask_is_the_rule_written_out(geometry, doc_ids):
    layout = StridedLayout(*geometry)
    docs = StridedDocuments(layout, T_([doc_ids, doc_ids[::-1]]))
    for b, ids in enumerate((doc_ids, doc_ids[::-1])):
        assert torch.equal(docs.allowed()[b], slow_document_allowed(layout, ids))
        rows = layout.step_rows(layout.gen_len - 1)
        assert torch.equal(step_mask(layout, layout.gen_len - 1, "sdpa", documents=docs)[b, 0],
                           slow_document_allowed(layout, ids)[rows, :rows.stop])
    eager = document_mask(docs, "eager", torch.float32)
    assert torch.equal(eager == 0, docs.allowed()[:, None])
    mask, positions = causal_document_mask(T_([doc_ids]))
    assert torch.equal(mask[0, 0], docs.allowed(slice(0, layout.seq_len), layout.seq_len)[0])
    assert torch.equal(positions, chunk_segments(T_([doc_ids]))[1])


# Two chunks of T=16 (C=2, s=3, G=3, n=2: NB=4, contexts x[0:e] for e = 2, 5, 8, 11): the first holds
# examples x[0:6] and x[6:16]; the second the tail of an example (x[0:9]) and the start of another.
LAYOUT = StridedLayout(16, 2, 3, 3, 2)
DOC_IDS = T_([[0] * 6 + [1] * 10, [4] * 9 + [5] * 7])


def start_of(doc_ids: torch.Tensor, t: int) -> int:
    """The chunk index where the example of token t begins (within the chunk)."""
    start = t
    while start > 0 and doc_ids[start - 1] == doc_ids[t]:
        start -= 1
    return start


def alone(model, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (L, H) of one sequence run alone from position 0."""
    hidden, _ = backbone_forward(model, ids[None], torch.arange(len(ids)))
    return hidden[0]


def row_sequences(chunk: torch.Tensor, tokens: torch.Tensor, doc_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """For every row of the strided row: the sequence that ends with it when its example runs alone
    (chunk rows: the example's tokens up to it; generated (j, k, g): the example's part of the context
    and the sample's tokens up to step g)."""
    out = {t: chunk[start_of(doc_ids, t): t + 1] for t in range(LAYOUT.seq_len)}
    for j in range(LAYOUT.num_samples):
        for k in range(LAYOUT.num_blocks):
            e = int(LAYOUT.context_end[k])
            context = chunk[start_of(doc_ids, e - 1): e]
            for g in range(LAYOUT.gen_len):
                out[int(LAYOUT.token_index[j, k, g])] = torch.cat([context, tokens[j, k, : g + 1]])
    return out


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(vocab_size=256, num_layers=4, hidden=64, seed=0).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    chunk = torch.randint(0, 256, (2, LAYOUT.seq_len), generator=g)
    tokens = torch.randint(0, 256, (2, LAYOUT.num_samples, LAYOUT.num_blocks, LAYOUT.gen_len), generator=g)
    return chunk, tokens, StridedDocuments(LAYOUT, DOC_IDS)


@torch.no_grad()
def test_strided_hidden_states_and_logprobs_equal_each_example_alone(model, batch):
    chunk, tokens, docs = batch
    row = LAYOUT.scatter_generated(chunk, tokens)
    hidden = strided_hidden(model, row, LAYOUT, docs)
    head = lm_head(model)
    logprobs = token_logprobs(hidden[:, LAYOUT.score_index], head.weight, tokens)
    for b in range(2):
        for r, sequence in row_sequences(chunk[b], tokens[b], DOC_IDS[b]).items():
            torch.testing.assert_close(hidden[b, r], alone(model, sequence)[-1], atol=2e-5, rtol=1e-5)
        for j in range(LAYOUT.num_samples):
            for k in range(LAYOUT.num_blocks):
                e = int(LAYOUT.context_end[k])
                sequence = torch.cat([chunk[b, start_of(DOC_IDS[b], e - 1): e], tokens[b, j, k]])
                expected = alone(model, sequence)[-LAYOUT.gen_len - 1: -1] @ head.weight.T
                expected = expected.log_softmax(-1).gather(-1, tokens[b, j, k, :, None])[:, 0]
                torch.testing.assert_close(logprobs[b, j, k], expected, atol=2e-5, rtol=1e-5)
    # the chunk's teacher-forced log-probs (the CE term's) are those of each example alone too
    assert not torch.allclose(hidden, strided_hidden(model, row, LAYOUT), atol=1e-3)   # the masking matters


@torch.no_grad()
def test_sampled_tokens_equal_each_example_alone_under_the_same_random_numbers(model, batch):
    chunk, _, docs = batch
    temperature, seed = 1.0, 11
    drawn = sample_strided(model, chunk, LAYOUT, temperature=temperature,
                           generator=torch.Generator().manual_seed(seed), documents=docs)
    # reference: every (chunk, sample, block) as its own sequence (its example's part of the context, from
    # position 0, no cache), one draw per step over the same (batch, n, NB) grid with the same generator
    head, rng = lm_head(model), torch.Generator().manual_seed(seed)
    n, NB, G = LAYOUT.num_samples, LAYOUT.num_blocks, LAYOUT.gen_len
    ref = torch.empty_like(drawn)
    for g in range(G):
        logits = torch.empty(2, n, NB, head.weight.shape[0])
        for b in range(2):
            for j in range(n):
                for k in range(NB):
                    e = int(LAYOUT.context_end[k])
                    sequence = torch.cat([chunk[b, start_of(DOC_IDS[b], e - 1): e], ref[b, j, k, :g]])
                    logits[b, j, k] = head.logits(alone(model, sequence)[-1])
        ref[..., g] = sample_from_logits(logits, temperature, 1.0, rng)
    assert torch.equal(drawn, ref)
    plain = sample_strided(model, chunk, LAYOUT, temperature=temperature, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(plain, drawn)                                        # the masking matters


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_feature_vectors_equal_each_example_alone(model, batch, pooling):
    chunk, tokens, docs = batch
    network = FeatureNetwork(model, layers=(0.5, 1.0), pooling=pooling)
    gen, gt = network.strided_features(LAYOUT.scatter_generated(chunk, tokens), LAYOUT, docs)
    G = LAYOUT.gen_len
    for b in range(2):
        for k in range(LAYOUT.num_blocks):
            e = int(LAYOUT.context_end[k])
            # the ground-truth window's rows each belong to their own example (a window may cross into the next)
            gt_rows = [chunk[b, start_of(DOC_IDS[b], t): t + 1] for t in range(e, e + G)]
            windows = [(gt_rows, gt[b, k])]
            context = chunk[b, start_of(DOC_IDS[b], e - 1): e]
            windows += [([torch.cat([context, tokens[b, j, k, : g + 1]]) for g in range(G)], gen[b, k, j])
                        for j in range(LAYOUT.num_samples)]
            for rows, feature in windows:
                taps = [torch.stack(per_row) for per_row in zip(*(
                    [h[0, -1] for h in network.tap_states(seq[None], torch.arange(len(seq)))] for seq in rows))]
                expected = network._pool([t if pooling == "mean" else t[-1] for t in taps])
                torch.testing.assert_close(feature, expected, atol=2e-5, rtol=1e-5)


def test_documents_must_fit_the_layout():
    with pytest.raises(ValueError, match=r"expected \(batch, T=16\)"):
        StridedDocuments(LAYOUT, torch.zeros(2, 15, dtype=torch.long))


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
def test_flex_document_block_mask_is_the_rule():
    from torch.nn.attention.flex_attention import create_mask

    docs = StridedDocuments(LAYOUT, DOC_IDS)
    mask = document_mask(docs, "flex_attention")
    assert mask.seq_lengths == (LAYOUT.length, LAYOUT.length)
    rule = create_mask(mask.mask_mod, 2, 1, LAYOUT.length, LAYOUT.length, device="cpu")[:, 0]
    assert torch.equal(rule, docs.allowed())
    blocks = mask.to_dense().bool()[:, 0]                                     # (B, q blocks, kv blocks)
    size = mask.BLOCK_SIZE
    covered = blocks.repeat_interleave(size[0], 1).repeat_interleave(size[1], 2)[:, :LAYOUT.length, :LAYOUT.length]
    assert not (docs.allowed() & ~covered).any()                               # no allowed pair is skipped
    rows = LAYOUT.step_rows(1)
    step = step_mask(LAYOUT, 1, "flex_attention", documents=docs)
    assert torch.equal(create_mask(step.mask_mod, 2, 1, rows.stop - rows.start, rows.stop, device="cpu")[:, 0],
                       docs.allowed(rows, rows.stop))


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_causal_chunk_pass_within_documents_equals_each_example_alone(model, batch, impl):
    """SFT's and validation's CE pass over a chunk (``FineTuneModule.hidden`` with document masking)."""
    chunk = batch[0]
    mask, positions = causal_chunk_mask(DOC_IDS, impl)
    model.set_attn_implementation(impl)
    try:
        hidden, _ = backbone_forward(model, chunk, positions, mask)
    finally:
        model.set_attn_implementation("sdpa")
    for b in range(2):
        for t in range(LAYOUT.seq_len):
            torch.testing.assert_close(hidden[b, t], alone(model, chunk[b, start_of(DOC_IDS[b], t): t + 1])[-1],
                                       atol=2e-5, rtol=1e-5)
