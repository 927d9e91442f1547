"""FlexAttention, the default on CUDA: its BlockMask is the strided rule, token by token, and a flex
forward gives sdpa's log-probs and draws (forward only: flex has no CPU backward)."""

import pytest
import torch

from ebft.core.strided import strided_hidden
from ebft.core.compat import lm_head
from ebft.models.loading import build_tiny_model, flex_available, resolve_attn
from ebft.objectives.losses import token_logprobs
from ebft.core.layout import StridedLayout
from ebft.core.masks import block_mask, step_mask
from ebft.rollout.sampler import sample_strided

# (T, C, s, G, n): one block of 128 x 128; n = 1; the translation geometry (C=4, s=2, G=4, n=4) at T=64
# (528 rows, 5 x 5 blocks); the code geometry (C=s=G=8, n=4) at T=256 (1,248 rows, 10 x 10 blocks)
GEOMETRIES = [(16, 4, 2, 3, 2), (40, 8, 8, 4, 1), (64, 4, 2, 4, 4), (256, 8, 8, 8, 4)]


def dense_of(mask) -> torch.Tensor:
    """Token-level (Q, K) bool form of a BlockMask: every row/column of a full block, and the
    ``mask_mod`` entries of a partial block; nothing in a block the mask skips."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    q_len, kv_len = mask.seq_lengths
    q_block, kv_block = mask.BLOCK_SIZE

    def blocks(num, index):
        if num is None:
            return torch.zeros(1, 1, -(-q_len // q_block), -(-kv_len // kv_block), dtype=torch.bool)
        only = BlockMask.from_kv_blocks(num, index, BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask.mask_mod,
                                        seq_lengths=mask.seq_lengths)
        return only.to_dense().bool()

    def tokens(block_matrix):
        return block_matrix[0, 0].repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:q_len, :kv_len]

    full = tokens(blocks(mask.full_kv_num_blocks, mask.full_kv_indices))
    partial = tokens(blocks(mask.kv_num_blocks, mask.kv_indices))
    rule = create_mask(mask.mask_mod, 1, 1, q_len, kv_len, device="cpu")[0, 0]
    return full | (partial & rule)


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_block_mask_is_the_layout_rule(geometry):
    layout = StridedLayout(*geometry)
    mask = block_mask(layout)
    assert mask.seq_lengths == (layout.length, layout.length)
    assert torch.equal(dense_of(mask), layout.allowed())
    for g in (0, layout.gen_len - 1):  # the KV-cached sampling steps: n*NB queries against the cache
        rows = layout.step_rows(g)
        assert torch.equal(dense_of(step_mask(layout, g, "flex_attention")), layout.allowed(rows, rows.stop))


def test_auto_picks_flex_for_strided_rows_on_cuda_only():
    flex = "flex_attention" if flex_available() else "sdpa"
    assert resolve_attn("auto", "cuda", strided=True) == flex
    assert resolve_attn("auto", "cuda:1", strided=True) == flex
    assert resolve_attn("auto", "cuda") == "sdpa"                 # plain causal attention: SFT, RLVR, evaluation
    assert resolve_attn("auto", "cpu", strided=True) == "sdpa"    # flex has no CPU backward
    assert resolve_attn("eager", "cuda", strided=True) == "eager"  # an explicit choice stays


@pytest.fixture(scope="module")
def flex_on_cpu():
    """Skip (with the reason) where this torch cannot run FlexAttention forwards on CPU."""
    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 8, 16)
    try:
        torch.compile(flex_attention)(q, q, q)
    except Exception as err:  # torch builds without a CPU flex kernel or without a C++ compiler
        pytest.skip(f"FlexAttention does not run on CPU with this torch: {type(err).__name__}: {err}")


def assert_flex_equals_sdpa(layout: StridedLayout, documents=None) -> None:
    """Strided log-probs and KV-cached draws (same random numbers) of one tiny model under flex and sdpa."""
    models = {impl: build_tiny_model(vocab_size=256, attn_implementation=impl, seed=0).eval()
              for impl in ("sdpa", "flex_attention")}
    chunk = torch.randint(0, 256, (2, layout.seq_len))
    tokens = torch.randint(0, 256, (2, layout.num_samples, layout.num_blocks, layout.gen_len))
    row = layout.scatter_generated(chunk, tokens)
    logprobs, draws = {}, {}
    for impl, model in models.items():
        with torch.no_grad():
            hidden = strided_hidden(model, row, layout, documents)
        head = lm_head(model)
        logprobs[impl] = token_logprobs(hidden[:, layout.score_index], head.weight, tokens, temperature=0.6)
        draws[impl] = sample_strided(model, chunk, layout, temperature=1.0, generator=torch.Generator().manual_seed(5),
                                     documents=documents)
    torch.testing.assert_close(logprobs["flex_attention"], logprobs["sdpa"], atol=1e-5, rtol=1e-5)
    assert torch.equal(draws["flex_attention"], draws["sdpa"])


def test_flex_forward_logprobs_and_draws_equal_sdpa(flex_on_cpu, monkeypatch):
    # one static compile per shape (3 here): inductor's CPU flex kernel for dynamic shapes, which a
    # second shape would otherwise trigger, does not compile with torch 2.13 (CUDA uses Triton)
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", False)
    assert_flex_equals_sdpa(StridedLayout(48, 4, 2, 2, 4))  # the translation C and s; G = 2 keeps 3 shapes


def test_flex_forward_with_documents_equals_sdpa(flex_on_cpu, monkeypatch):
    """Document masking (a BlockMask per batch) under flex gives sdpa's log-probs and draws."""
    from ebft.core.documents import StridedDocuments

    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_shapes", False)
    layout = StridedLayout(48, 4, 2, 2, 4)
    assert_flex_equals_sdpa(layout, StridedDocuments(layout, torch.tensor([[0] * 20 + [1] * 28,
                                                                           [3] * 5 + [4] * 30 + [5] * 13])))
