"""Strided scoring and sampling on the tiny random model against one-context-at-a-time references."""

import inspect

import pytest
import torch

from bench.samplers import sample_authors_style, sample_strided_nocache
from ebft.core.compat import LMHead, backbone_forward, cache_kwarg, get_lm_head
from ebft.models.loading import build_tiny_model
from ebft.core.layout import StridedLayout
from ebft.core.masks import strided_mask
from ebft.rollout.sampler import sample_from_logits, sample_strided

VOCAB = 256


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_tiny_model(vocab_size=VOCAB, num_layers=4, hidden=64, seed=0,
                            attn_implementation=request.param).eval()


def separate_logprobs(model, chunk, generated, layout):
    """log p(generated[b, j, k, g] | x[0:C+k*s], generated[b, j, k, :g]) with one causal pass per sequence."""
    out = torch.empty(generated.shape)
    with torch.no_grad():
        for b in range(generated.shape[0]):
            for j in range(layout.num_samples):
                for k in range(layout.num_blocks):
                    c = int(layout.context_end[k])
                    seq = torch.cat([chunk[b, :c], generated[b, j, k]])[None]
                    logp = torch.log_softmax(model(seq).logits[0], dim=-1)
                    out[b, j, k] = logp[c - 1: c - 1 + layout.gen_len].gather(1, generated[b, j, k, :, None])[:, 0]
    return out


def strided_logprobs(model, chunk, generated, layout):
    """The same log-probs from ONE forward over the strided row, logits read at score_index."""
    row = layout.scatter_generated(chunk, generated)
    impl = model.config._attn_implementation
    with torch.no_grad():
        hidden, _ = backbone_forward(model, row, layout.position_ids, strided_mask(layout, impl))
        logp = torch.log_softmax(get_lm_head(model)(hidden), dim=-1)
    return logp[:, layout.score_index].gather(-1, row[:, layout.token_index, None])[..., 0]


@pytest.mark.parametrize("geometry", [(12, 4, 4, 4, 1), (14, 4, 2, 4, 3), (11, 2, 3, 3, 2)])
def test_strided_logprobs_equal_separate_sequences(model, geometry):
    layout = StridedLayout(*geometry)
    chunk = torch.randint(0, VOCAB, (2, layout.seq_len))
    generated = torch.randint(0, VOCAB, (2, layout.num_samples, layout.num_blocks, layout.gen_len))
    torch.testing.assert_close(strided_logprobs(model, chunk, generated, layout),
                               separate_logprobs(model, chunk, generated, layout), atol=1e-5, rtol=0)


def test_shift_by_one_is_wrong(tiny_model):
    """Reading generated tokens' logits at row - 1 (the usual shift) gives other numbers than score_index."""
    layout = StridedLayout(12, 4, 4, 4, 2)
    chunk = torch.randint(0, VOCAB, (1, 12))
    generated = torch.randint(0, VOCAB, (1, 2, layout.num_blocks, 4))
    row = layout.scatter_generated(chunk, generated)
    with torch.no_grad():
        hidden, _ = backbone_forward(tiny_model, row, layout.position_ids, strided_mask(layout, "sdpa"))
        logp = torch.log_softmax(get_lm_head(tiny_model)(hidden), dim=-1)
    shifted = logp[:, layout.token_index - 1].gather(-1, row[:, layout.token_index, None])[..., 0]
    reference = separate_logprobs(tiny_model, chunk, generated, layout)
    assert (shifted - reference).abs().amax(dim=(0, 1, 2)).gt(1e-2).all()


def greedy_continuations(model, chunk, layout):
    """Per-prefix greedy decoding, one context at a time: (batch, NB, G)."""
    out = torch.empty(chunk.shape[0], layout.num_blocks, layout.gen_len, dtype=torch.long)
    with torch.no_grad():
        for b in range(chunk.shape[0]):
            for k in range(layout.num_blocks):
                seq = chunk[b, : int(layout.context_end[k])]
                for g in range(layout.gen_len):
                    out[b, k, g] = model(seq[None]).logits[0, -1].argmax()
                    seq = torch.cat([seq, out[b, k, g, None]])
    return out


def test_greedy_equals_per_prefix_greedy(model):
    layout = StridedLayout(14, 3, 2, 4, 2)
    chunk = torch.randint(0, VOCAB, (2, 14))
    expected = greedy_continuations(model, chunk, layout)
    for sampler in (sample_strided, sample_strided_nocache, sample_authors_style):
        tokens = sampler(model, chunk, layout, temperature=0.0)
        assert tokens.shape == (2, 2, layout.num_blocks, 4)
        assert torch.equal(tokens, expected[:, None].expand_as(tokens)), sampler.__name__


def test_greedy_equals_generate(tiny_model):
    layout = StridedLayout(10, 4, 3, 3, 1)
    chunk = torch.randint(0, VOCAB, (1, 10))
    tokens = sample_strided(tiny_model, chunk, layout, temperature=0.0)
    for k in range(layout.num_blocks):
        prompt = chunk[:, : int(layout.context_end[k])]
        out = tiny_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        assert torch.equal(out[0, prompt.shape[1]:], tokens[0, 0, k])


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_cached_and_nocache_draw_the_same_tokens(model, top_p):
    layout = StridedLayout(15, 3, 3, 4, 3)
    chunk = torch.randint(0, VOCAB, (2, 15))
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    cached = sample_strided(model, chunk, layout, temperature=1.0, top_p=top_p, generator=gen_a)
    oracle = sample_strided_nocache(model, chunk, layout, temperature=1.0, top_p=top_p, generator=gen_b)
    assert torch.equal(cached, oracle)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())
    # at temperature 1 the samples of one context differ (random model, 256 tokens)
    assert not torch.equal(cached[:, 0], cached[:, 1])


def test_lm_head_only_on_sampled_rows(tiny_model, monkeypatch):
    layout = StridedLayout(15, 3, 3, 4, 3)
    shapes = []
    logits = LMHead.logits
    monkeypatch.setattr(LMHead, "logits", lambda head, hidden: shapes.append(tuple(hidden.shape)) or logits(head, hidden))
    sample_strided(tiny_model, torch.randint(0, VOCAB, (2, 15)), layout)
    nb = layout.num_blocks
    assert shapes == [(2, nb, 64)] + [(2, 3 * nb, 64)] * 3


def test_top_p_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    for top_p, kept in [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        drawn = sample_from_logits(logits, 1.0, top_p, gen)
        assert set(drawn.tolist()) == kept, top_p
    drawn = sample_from_logits(logits, 1.0, 0.81, gen)       # renormalised nucleus: 0.5/0.95, 0.3/0.95, 0.15/0.95
    freq = torch.bincount(drawn, minlength=4).float() / 4000
    torch.testing.assert_close(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03, rtol=0)
    assert torch.equal(sample_from_logits(logits[:3], 0.0, 1.0, None), torch.zeros(3, dtype=torch.long))


def test_tiny_top_p_is_greedy(tiny_model):
    layout = StridedLayout(12, 4, 4, 4, 2)
    chunk = torch.randint(0, VOCAB, (1, 12))
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(sample_strided(tiny_model, chunk, layout, temperature=1.0, top_p=1e-6, generator=gen),
                       sample_strided(tiny_model, chunk, layout, temperature=0.0))


def test_model_mode_restored_and_no_grad(tiny_model):
    layout = StridedLayout(12, 4, 4, 4, 2)
    chunk = torch.randint(0, VOCAB, (1, 12))
    tiny_model.train()
    tokens = sample_strided(tiny_model, chunk, layout)
    assert tiny_model.training and all(m.training for m in tiny_model.modules())
    assert not tokens.requires_grad and not tokens.is_inference()
    tiny_model.eval()
    sample_strided_nocache(tiny_model, chunk, layout)
    assert not tiny_model.training


def test_argument_errors(tiny_model):
    layout = StridedLayout(12, 4, 4, 4, 2)
    with pytest.raises(ValueError, match=r"\(batch, T=12\)"):
        sample_strided(tiny_model, torch.zeros(1, 11, dtype=torch.long), layout)
    with pytest.raises(ValueError, match="temperature=-1"):
        sample_strided(tiny_model, torch.zeros(1, 12, dtype=torch.long), layout, temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        sample_strided(tiny_model, torch.zeros(1, 12, dtype=torch.long), layout, top_p=0)


def test_cache_kwarg_by_signature(tiny_model):
    class Legacy(torch.nn.Module):              # transformers 5.17 signature
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None):
            return input_ids

    class Unknown(torch.nn.Module):
        def forward(self, input_ids=None):
            return input_ids

    # the installed transformers' own name (5.17: past_key_values; 5.24: cache)
    assert cache_kwarg(tiny_model.model) in inspect.signature(tiny_model.model.forward).parameters
    assert cache_kwarg(Legacy()) == "past_key_values"
    with pytest.raises(ValueError, match="neither `cache` nor `past_key_values`"):
        cache_kwarg(Unknown())


def test_qwen2_architecture():
    """Qwen2 (biased q/k/v projections, per-layer attention types) goes through the same code."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    layout = StridedLayout(11, 3, 2, 3, 2)
    chunk = torch.randint(0, VOCAB, (1, 11))
    tokens = sample_strided(model, chunk, layout, temperature=0.0)
    assert torch.equal(tokens, greedy_continuations(model, chunk, layout)[:, None].expand_as(tokens))
    generated = torch.randint(0, VOCAB, (1, 2, layout.num_blocks, 3))
    torch.testing.assert_close(strided_logprobs(model, chunk, generated, layout),
                               separate_logprobs(model, chunk, generated, layout), atol=1e-5, rtol=0)
