"""The fast paths of the EBFT step give the same numbers as the plain ones.

- masks are cached per layout and equal freshly built ones;
- banded sdpa over the strided row and over each sampling step equals sdpa with the dense mask
  (values and gradients), and every other attention call goes through transformers' sdpa unchanged;
- the fused chunked log-probs equal full-logits ones under autocast too;
- inverse-CDF sampling draws the softmax distribution;
- ``actor_loss`` equals the loss built by hand from full logits over the strided row.
"""

import pytest
import torch
import torch.nn.functional as F

from bench.samplers import dense_strided_sdpa
from ebft.core.strided import strided_hidden
from ebft.objectives.ebft_update import actor_loss
from ebft.core.compat import backbone_forward
from ebft.models.loading import build_tiny_model
from ebft.objectives.losses import token_logprobs
from ebft.core import masks
from ebft.core.layout import StridedLayout
from ebft.core.masks import band_plan, banded_sdpa, banded_step_sdpa, step_mask, strided_mask
from ebft.rollout.sampler import sample_from_logits, sample_strided

VOCAB = 256
GEOMETRIES = [(13, 3, 3, 2, 3), (12, 4, 4, 4, 1), (40, 4, 3, 5, 2), (64, 8, 8, 8, 4)]


@pytest.fixture
def band_rows():
    """Set ``masks.BAND_ROWS`` for one test and restore it."""
    previous = masks.BAND_ROWS
    yield lambda rows: setattr(masks, "BAND_ROWS", rows)
    masks.BAND_ROWS = previous


# ---- mask cache ------------------------------------------------------------------------------------

def test_cached_masks_equal_fresh_ones():
    lay = StridedLayout(13, 3, 3, 2, 3)
    for impl, dtype in [("sdpa", torch.float32), ("eager", torch.float32), ("eager", torch.bfloat16)]:
        first = strided_mask(lay, impl, dtype)
        assert strided_mask(lay, impl, dtype) is first                      # built once
        fresh = masks._build_mask(lay, impl, dtype, None, None)
        assert first.dtype == fresh.dtype and torch.equal(first, fresh)
        for g in range(lay.gen_len):
            step = step_mask(lay, g, impl, dtype)
            assert step_mask(lay, g, impl, dtype) is step
            rows = lay.step_rows(g)
            assert torch.equal(step, masks._build_mask(lay, impl, dtype, rows, rows.stop))
    assert strided_mask(lay, "eager", torch.bfloat16).dtype == torch.bfloat16
    assert strided_mask(lay, "sdpa").strided_layout is lay
    assert not hasattr(step_mask(lay, 0, "sdpa"), "strided_layout")
    rows = torch.tensor([lay.seq_len, lay.seq_len + 1])                      # tensor rows: built each call
    assert torch.equal(strided_mask(lay, "sdpa", query_rows=rows), lay.allowed(rows)[None, None])


def test_mask_cache_is_per_layout_and_device_copy():
    a, b = StridedLayout(13, 3, 3, 2, 3), StridedLayout(13, 3, 3, 2, 3)
    assert strided_mask(a, "sdpa") is not strided_mask(b, "sdpa")
    assert torch.equal(strided_mask(a, "sdpa"), strided_mask(b, "sdpa"))
    assert a.to("cpu") is a


# ---- banded sdpa -----------------------------------------------------------------------------------

def test_band_plan_covers_every_generated_row_once(band_rows):
    band_rows(8)
    lay = StridedLayout(40, 4, 3, 5, 2)
    plan = band_plan(lay)
    assert sum(rows for rows, _, _ in plan) == lay.length - lay.seq_len
    for rows, end, mask in plan:
        assert mask.shape == (1, 1, rows, end + rows)
        assert mask[0, 0].any(dim=1).all()                                   # every query sees a key


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("rows", [1, 8, 128])
def test_banded_sdpa_equals_dense_mask(band_rows, geometry, heads, rows):
    band_rows(rows)
    lay = StridedLayout(*geometry)
    hq, hkv = heads
    q = torch.randn(2, hq, lay.length, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hkv, lay.length, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hkv, lay.length, 8, dtype=torch.float64, requires_grad=True)
    got = banded_sdpa(q, k, v, lay, scaling=0.3)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1),
                                         attn_mask=lay.allowed(), scale=0.3).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    probe = torch.randn_like(ref)
    for g_got, g_ref in zip(torch.autograd.grad((got * probe).sum(), (q, k, v)),
                            torch.autograd.grad((ref * probe).sum(), (q, k, v))):
        torch.testing.assert_close(g_got, g_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("rows", [1, 8, 128])
def test_banded_step_sdpa_equals_step_mask(band_rows, geometry, rows):
    band_rows(rows)
    lay = StridedLayout(*geometry)
    for g in range(lay.gen_len):
        keys = lay.step_rows(g).stop
        q = torch.randn(2, 4, lay.num_samples * lay.num_blocks, 8, dtype=torch.float64)
        k, v = torch.randn(2, 2, keys, 8, dtype=torch.float64), torch.randn(2, 2, keys, 8, dtype=torch.float64)
        got = banded_step_sdpa(q, k, v, lay, g, scaling=0.3)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=step_mask(lay, g, "sdpa"), scale=0.3).transpose(1, 2)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_sampler_draws_the_same_with_banded_and_dense_attention():
    model = _double_model().eval()
    lay = StridedLayout(40, 4, 3, 5, 3)
    chunk = torch.randint(0, VOCAB, (2, 40))
    banded = sample_strided(model, chunk, lay, temperature=1.0, generator=torch.Generator().manual_seed(5))
    with dense_strided_sdpa():
        dense = sample_strided(model, chunk, lay, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(banded, dense)


def _double_model(**kwargs):
    return build_tiny_model(vocab_size=VOCAB, num_layers=2, hidden=64, seed=0, **kwargs).double()


@pytest.mark.parametrize("geometry", [(40, 4, 3, 5, 2), (64, 8, 8, 8, 4)])
def test_strided_forward_backward_banded_equals_dense(geometry):
    model = _double_model()
    lay = StridedLayout(*geometry)
    row = torch.randint(0, VOCAB, (2, lay.length))
    params = list(model.parameters())
    banded = strided_hidden(model, row, lay)
    g_banded = torch.autograd.grad(banded.square().sum(), params)
    with dense_strided_sdpa():
        dense = strided_hidden(model, row, lay)
        g_dense = torch.autograd.grad(dense.square().sum(), params)
    torch.testing.assert_close(banded, dense, atol=1e-10, rtol=1e-10)
    for a, b in zip(g_banded, g_dense):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_banded_path_runs_only_for_strided_rows(monkeypatch):
    model = _double_model()
    lay = StridedLayout(40, 4, 3, 5, 2)
    strided_mask(lay, "sdpa")                                                # installs the wrapper
    calls = []
    monkeypatch.setattr(masks, "banded_sdpa", lambda *a, **k: calls.append(1) or masks.__dict__["_real"](*a, **k))
    monkeypatch.setitem(masks.__dict__, "_real", banded_sdpa)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        plain = model(ids).logits                                            # causal, no mask: not banded
        assert calls == []
        strided_hidden(model, lay.scatter_generated(torch.randint(0, VOCAB, (1, 40)),
                                                    torch.randint(0, VOCAB, (1, 2, lay.num_blocks, 5))), lay)
        assert len(calls) == 2                                               # one per layer
        with dense_strided_sdpa():
            assert torch.equal(model(ids).logits, plain)
    eager = _double_model(attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, plain)


def test_gradient_checkpointing_keeps_the_banded_path():
    model = _double_model()
    lay = StridedLayout(40, 4, 3, 5, 2)
    row = torch.randint(0, VOCAB, (1, lay.length))
    model.train()
    expected = torch.autograd.grad(strided_hidden(model, row, lay).sum(), list(model.parameters()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = torch.autograd.grad(strided_hidden(model, row, lay).sum(), list(model.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# ---- log-probs -------------------------------------------------------------------------------------

def test_logprobs_under_autocast_match_full_logits():
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(hidden, weight, targets, 0.6, chunk_size=8)
    full = ((hidden.bfloat16() @ weight.bfloat16().T).float() / 0.6).log_softmax(-1)
    full = full.gather(-1, targets[:, None])[:, 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full)
    probe = torch.randn(37)
    g_got = torch.autograd.grad((got * probe).sum(), (hidden, weight))
    g_full = torch.autograd.grad((full * probe).sum(), (hidden, weight))
    for a, b in zip(g_got, g_full):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)               # bf16 matmuls in both


def test_logprobs_only_some_inputs_need_grad():
    hidden, weight, targets = torch.randn(9, 8), torch.randn(30, 8, requires_grad=True), torch.randint(0, 30, (9,))
    got = token_logprobs(hidden, weight, targets, chunk_size=4)
    (grad,) = torch.autograd.grad(got.sum(), weight)
    full = (hidden @ weight.T).log_softmax(-1).gather(-1, targets[:, None]).sum()
    torch.testing.assert_close(grad, torch.autograd.grad(full, weight)[0])


def test_actor_loss_equals_full_logits_reference():
    model = build_tiny_model(vocab_size=VOCAB, num_layers=2, hidden=64, seed=0)
    lay = StridedLayout(40, 4, 3, 5, 2)
    ids = torch.randint(0, VOCAB, (2, 40))
    row = lay.scatter_generated(ids, torch.randint(0, VOCAB, (2, 2, lay.num_blocks, 5)))
    adv = torch.randn(2, 2, lay.num_blocks)
    params = list(model.parameters())
    loss, pg, ce = actor_loss(model, lay, row, adv, temperature=0.6, gamma=0.1)
    got = torch.autograd.grad(loss, params)
    with dense_strided_sdpa():
        hidden, _ = backbone_forward(model, row, lay.position_ids, lay.allowed()[None, None])
    logits = model.get_output_embeddings()(hidden)                          # (B, length, V), all rows
    logp = (logits / 0.6).log_softmax(-1)[:, lay.score_index].gather(-1, row[:, lay.token_index, None])[..., 0]
    ref_pg = (-lay.broadcast_to_tokens(adv) * logp).mean()
    ref_ce = F.cross_entropy(logits[:, :39].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(pg, ref_pg)
    torch.testing.assert_close(ce, ref_ce)
    expected = torch.autograd.grad(ref_pg + 0.1 * ref_ce, params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ---- sampling --------------------------------------------------------------------------------------

def test_inverse_cdf_sampling_draws_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")]).expand(20000, 5)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_from_logits(logits, 0.7, 1.0, gen)
    freq = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0].double() / 0.7, -1), atol=0.01, rtol=0)
    assert freq[4] == 0                                                      # zero-probability token
    again = sample_from_logits(logits, 0.7, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)                                         # reproducible per generator


def test_sampling_of_peaked_and_flat_rows():
    peaked = torch.full((3, 49152), -1e4)
    peaked[:, 123] = 0
    assert sample_from_logits(peaked, 0.6, 1.0, torch.Generator().manual_seed(1)).eq(123).all()
    flat = torch.zeros(4000, 7)
    drawn = sample_from_logits(flat, 1.0, 1.0, torch.Generator().manual_seed(2))
    assert set(drawn.tolist()) == set(range(7))
