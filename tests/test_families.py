"""Every model family listed in ``ebft.core.compat.SUPPORTED_FAMILIES`` is exact: for a tiny random
config of each, the strided actor's log-probs and CE and the strided sampler's distributions equal
the model's own full forward (``model(input_ids).logits``, with its LM-head bias and final-logit
soft-capping), each context run as its own causal sequence. Other families are refused."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import ebft.rollout.sampler as sampler_module
from ebft.objectives.ebft_update import actor_loss
from ebft.core.compat import SUPPORTED_FAMILIES, UnsupportedModelError, attention_for, check_strided, lm_head
from ebft.models.features import FeatureNetwork
from ebft.core.layout import StridedLayout
from ebft.rollout.sampler import sample_strided

VOCAB = 96
LAYOUT = StridedLayout(16, 4, 3, 3, 2)  # NB = 4, strided row of 16 + 24 tokens
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    # sliding windows as short as the chunk: the strided row (40 tokens) and the KV cache outgrow them
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    # soft-capping small enough to bite on a random model
    "gemma2": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 0.5, "attn_logit_softcapping": 2.0,
                                "sliding_window": 16, "query_pre_attn_scalar": 8}),
    "phi": ("PhiConfig", {"tie_word_embeddings": False}),
}


def family_model(family: str, attn: str = "sdpa"):
    cls, extra = CONFIGS[family]
    config = getattr(transformers, cls)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(config, attn),
                                                          dtype=torch.float32)
    head = model.get_output_embeddings()
    with torch.no_grad():
        # random weights of a realistic scale: logits of several units, so soft-capping and biases matter
        head.weight.normal_(0, 0.3)
        if head.bias is not None:
            head.bias.normal_(0, 1.0)
    return model.eval()


def test_every_supported_family_has_a_test_config():
    assert set(CONFIGS) == set(SUPPORTED_FAMILIES)


def test_the_configs_exercise_bias_and_softcapping():
    heads = {family: lm_head(family_model(family)) for family in ("phi", "gemma2", "llama")}
    assert heads["phi"].bias is not None and heads["phi"].bias.abs().sum() > 0
    assert heads["gemma2"].softcap == 0.5 and heads["llama"].softcap is None and heads["llama"].bias is None


def reference_logits(model, chunk: torch.Tensor, tokens: torch.Tensor, layout: StridedLayout) -> torch.Tensor:
    """(batch, n, NB, G, V): logits that score (predict) token g of (j, k), from the model's own forward
    over ``x[0 : C + k*s] + y_jk`` alone."""
    B, n, NB, G = tokens.shape
    out = torch.empty(B, n, NB, G, VOCAB)
    with torch.no_grad():
        for b in range(B):
            for k in range(NB):
                end = int(layout.context_end[k])
                seqs = torch.cat([chunk[b, :end].expand(n, end), tokens[b, :, k]], dim=1)
                out[b, :, k] = model(seqs).logits[:, end - 1: end - 1 + G].float()
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_strided_logprobs_and_ce_equal_the_models_own_forward(family):
    model = family_model(family)
    torch.manual_seed(1)
    chunk = torch.randint(0, VOCAB, (2, LAYOUT.seq_len))
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.num_samples, LAYOUT.num_blocks, LAYOUT.gen_len))
    advantages = torch.randn(2, LAYOUT.num_samples, LAYOUT.num_blocks)
    temperature, gamma = 0.7, 0.5
    row = LAYOUT.scatter_generated(chunk, tokens)
    loss, pg, ce = actor_loss(model, LAYOUT, row, advantages, temperature=temperature, gamma=gamma)

    logp = (reference_logits(model, chunk, tokens, LAYOUT) / temperature).log_softmax(-1)
    logp = logp.gather(-1, tokens.unsqueeze(-1))[..., 0]                     # (B, n, NB, G)
    expected_pg = (-advantages.unsqueeze(-1) * logp).mean()                   # token mean, as the authors
    with torch.no_grad():
        logits = model(chunk).logits.float()
    expected_ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
    torch.testing.assert_close(pg, expected_pg, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ce, expected_ce, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss, expected_pg + gamma * expected_ce, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_sampler_draws_from_the_models_own_distribution(family, monkeypatch):
    """The logits every draw of the KV-cached strided sampler uses are the model's own logits of that
    context and the tokens drawn before (so the drawn distribution softmax(logits / T) is too)."""
    model = family_model(family)
    seen = []
    draw = sampler_module.sample_from_logits
    monkeypatch.setattr(sampler_module, "sample_from_logits",
                        lambda logits, *args: seen.append(logits.float().clone()) or draw(logits, *args))
    chunk = torch.randint(0, VOCAB, (2, LAYOUT.seq_len))
    tokens = sample_strided(model, chunk, LAYOUT, temperature=1.0, generator=torch.Generator().manual_seed(3))
    used = torch.stack(seen, dim=3)                                           # (B, n, NB, G, V)
    torch.testing.assert_close(used, reference_logits(model, chunk, tokens, LAYOUT), atol=2e-5, rtol=1e-5)


def test_feature_network_of_a_sliding_window_family_matches_separate_contexts():
    """Features of Mistral with a window as long as the chunk: the strided row (longer than the window)
    gives each completion the hidden states of its own causal sequence."""
    model = family_model("mistral")
    net = FeatureNetwork(model, layers=(0.5,), pooling="last_token")  # tap: output of layer 1
    chunk = torch.randint(0, VOCAB, (1, LAYOUT.seq_len))
    tokens = torch.randint(0, VOCAB, (1, LAYOUT.num_samples, LAYOUT.num_blocks, LAYOUT.gen_len))
    gen, _ = net.strided_features(LAYOUT.scatter_generated(chunk, tokens), LAYOUT)  # (1, NB, n, D)
    for k in range(LAYOUT.num_blocks):
        end = int(LAYOUT.context_end[k])
        seqs = torch.cat([chunk[0, :end].expand(LAYOUT.num_samples, end), tokens[0, :, k]], dim=1)
        with torch.no_grad():
            last = model(seqs, output_hidden_states=True).hidden_states[1][:, -1]
        torch.testing.assert_close(gen[0, k], F.normalize(last, dim=-1), atol=2e-5, rtol=1e-5)


def test_unsupported_family_is_refused():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="model family 'gpt2'.*gemma2"):
        lm_head(model)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        sample_strided(model, torch.randint(0, VOCAB, (1, LAYOUT.seq_len)), LAYOUT)


def test_attention_softcapping_needs_eager_or_flex():
    model = family_model("gemma2")
    assert model.config._attn_implementation == "eager"  # sdpa asked, eager given (attention_for)
    model.config._attn_implementation = "sdpa"
    with pytest.raises(UnsupportedModelError, match="soft-caps attention logits.*eager or flex_attention"):
        check_strided(model, LAYOUT.seq_len)


def test_sliding_window_shorter_than_the_chunk_is_refused():
    model = family_model("mistral")
    with pytest.raises(UnsupportedModelError, match="sliding_window=16 < task.seq_len=24.*seq_len <= 16"):
        check_strided(model, 24)
    check_strided(model, 16)
