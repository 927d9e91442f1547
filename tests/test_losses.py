"""Chunked token log-probs, policy-gradient and PPO losses, and the CE term."""

import pytest
import torch
import torch.nn.functional as F

from ebft.objectives.losses import cross_entropy_term, policy_gradient_loss, ppo_clipped_loss, token_logprobs


def _leaf(*shape):
    return torch.randn(*shape).requires_grad_()


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ---- token_logprobs --------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 8, 1024])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_chunked_logprobs_equal_full_logits_values_and_gradients(temperature, chunk_size, softcap):
    hidden, weight, bias = (0.25 * torch.randn(2, 19, 16)).requires_grad_(), _leaf(50, 16), _leaf(50)
    targets = torch.randint(0, 50, (2, 19))
    probe = torch.randn(2, 19)  # a non-uniform cotangent checks every row's gradient
    got = token_logprobs(hidden, weight, targets, temperature, chunk_size, lm_head_bias=bias, softcap=softcap)
    logits = hidden @ weight.T + bias
    if softcap is not None:  # Gemma-2's final-logit soft-capping, applied before the temperature
        logits = softcap * torch.tanh(logits / softcap)
    full = (logits / temperature).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-6)
    for g_got, g_full in zip(_grads((got * probe).sum(), hidden, weight, bias),
                             _grads((full * probe).sum(), hidden, weight, bias)):
        torch.testing.assert_close(g_got, g_full, atol=1e-6, rtol=1e-5)


def test_temperature_divides_the_logits():
    hidden, weight, targets = torch.randn(5, 8), torch.randn(30, 8), torch.randint(0, 30, (5,))
    hot = token_logprobs(hidden, weight, targets, temperature=2.0)
    torch.testing.assert_close(hot, token_logprobs(hidden / 2, weight, targets))
    assert (hot - token_logprobs(hidden, weight, targets)).abs().max() > 1e-3


def test_bf16_weights_give_fp32_logprobs():
    hidden, weight, targets = torch.randn(6, 8), torch.randn(30, 8), torch.randint(0, 30, (6,))
    got = token_logprobs(hidden.bfloat16(), weight.bfloat16(), targets)
    assert got.dtype == torch.float32
    expected = (hidden.bfloat16() @ weight.bfloat16().T).float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(got, expected)


def test_backward_memory_stays_chunked():
    """Checkpointing: the forward keeps only inputs, never chunk after chunk of vocab-wide tensors."""
    rows, vocab, width, chunk = 64, 512, 8, 8
    hidden, weight, targets = _leaf(rows, width), _leaf(vocab, width), torch.randint(0, vocab, (rows,))
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(hidden, weight, targets, chunk_size=chunk)
    assert sum(saved.values()) < rows * vocab / 4  # no logits / log-softmax of all rows kept alive
    out.sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_logprob_shape_errors():
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(torch.randn(4, 8), torch.randn(30, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_logprobs(torch.randn(4, 8), torch.randn(30, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature=0"):
        token_logprobs(torch.randn(4, 8), torch.randn(30, 8), torch.zeros(4, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="softcap=0"):
        token_logprobs(torch.randn(4, 8), torch.randn(30, 8), torch.zeros(4, dtype=torch.long), softcap=0)


# ---- policy-gradient loss --------------------------------------------------------------------------

# grid (n=2, NB=1, G=2): sample 0 has advantage +1, sample 1 has -1
LOGP = torch.tensor([[[-1.0, -2.0]], [[-3.0, -4.0]]])
ADV = torch.tensor([[[1.0, 1.0]], [[-1.0, -1.0]]])


def test_pg_token_mean_closed_form():
    logp = LOGP.clone().requires_grad_()
    loss = policy_gradient_loss(logp, ADV)
    # rows: mean(1, 2) = 1.5 and mean(-3, -4) = -3.5; mean over rows -1
    assert float(loss.detach()) == pytest.approx(-1.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -ADV / 4)


def test_pg_sequence_sum_is_eq7():
    logp = LOGP.clone().requires_grad_()
    loss = policy_gradient_loss(logp, ADV, reduction="sequence_sum")
    # completions: -(1)(-3) = 3 and -(-1)(-7) = -7; mean -2: G times the token mean
    assert float(loss.detach()) == pytest.approx(-2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -ADV / 2)


def test_pg_mask_takes_a_per_row_mean():
    mask = torch.tensor([[[True, True]], [[True, False]]])
    # rows 1.5 and -3 -> -0.75 (a mean over the three tokens would give 0)
    assert float(policy_gradient_loss(LOGP, ADV, mask)) == pytest.approx(-0.75)
    assert float(policy_gradient_loss(LOGP, ADV, mask, "sequence_sum")) == pytest.approx(0.0)  # (3 - 3) / 2


def test_pg_token_mean_over_chunks_samples_and_blocks():
    logp, adv = torch.randn(3, 4, 5, 2), torch.randn(3, 4, 1, 1).expand(3, 4, 5, 2)
    slow = torch.stack([torch.stack([(-adv[b, j] * logp[b, j]).mean() for j in range(4)]).mean()
                        for b in range(3)]).mean()
    torch.testing.assert_close(policy_gradient_loss(logp, adv), slow)
    # equal token counts per row: also the mean over all generated tokens
    torch.testing.assert_close(policy_gradient_loss(logp, adv), (-adv * logp).mean())
    torch.testing.assert_close(policy_gradient_loss(logp, adv, reduction="sequence_sum"),
                               (-adv * logp).sum(-1).mean())


def test_pg_detaches_advantages_and_survives_empty_masks():
    logp, adv = _leaf(2, 3, 4), _leaf(2, 3, 4)
    loss = policy_gradient_loss(logp, adv, torch.zeros(2, 3, 4, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert adv.grad is None and torch.equal(logp.grad, torch.zeros(2, 3, 4))


def test_pg_errors():
    with pytest.raises(ValueError, match="reduction='sum'"):
        policy_gradient_loss(LOGP, ADV, reduction="sum")
    with pytest.raises(ValueError, match="broadcast per token"):
        policy_gradient_loss(LOGP, ADV[..., :1])
    with pytest.raises(ValueError, match="token grid"):
        policy_gradient_loss(torch.zeros(4, 2), torch.zeros(4, 2))


# ---- PPO clipped loss --------------------------------------------------------------------------------

def test_ppo_first_update_is_the_plain_policy_gradient():
    logp, adv = _leaf(2, 4, 3, 2), torch.randn(2, 4, 1, 1).expand(2, 4, 3, 2)
    ppo = ppo_clipped_loss(logp, logp.detach(), adv, torch.ones(2, 4, 3, 2))
    torch.testing.assert_close(ppo, -adv.mean())  # ratio = 1
    torch.testing.assert_close(_grads(ppo, logp)[0], _grads(policy_gradient_loss(logp, adv), logp)[0])


def test_ppo_clipping_closed_form():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # min(rho A, clip(rho) A): 1.2, -1.5, 0.5, -0.8
    loss = ppo_clipped_loss(logp, old, adv, torch.ones(4))
    assert float(loss.detach()) == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4)
    loss.backward()  # clipped tokens get no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.5, -0.5, 0.0]) / 4)


def test_ppo_masked_mean_and_empty_mask():
    logp, adv = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert float(ppo_clipped_loss(logp, logp, adv, mask)) == pytest.approx(-(1 + 2 + 6) / 3)
    assert float(ppo_clipped_loss(logp, logp, adv, torch.zeros(2, 3))) == 0.0
    with pytest.raises(ValueError, match="clip_eps=1.5"):
        ppo_clipped_loss(logp, logp, adv, mask, clip_eps=1.5)


# ---- cross-entropy term ------------------------------------------------------------------------------

def _ce_case():
    hidden, weight = _leaf(2, 9, 8), _leaf(40, 8)
    ids = torch.randint(0, 40, (2, 9))
    return hidden, weight, ids, hidden @ weight.T


def test_ce_term_equals_cross_entropy_on_all_tokens():
    hidden, weight, ids, logits = _ce_case()
    got = cross_entropy_term(hidden, weight, ids, chunk_size=5)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(cross_entropy_term(hidden, weight, ids, torch.ones(2, 9)), expected)
    for g_got, g_exp in zip(_grads(got, hidden, weight), _grads(expected, hidden, weight)):
        torch.testing.assert_close(g_got, g_exp)


def test_ce_term_counts_only_masked_targets():
    hidden, weight, ids, logits = _ce_case()
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, 2:4] = True
    mask[:, 0] = True  # the first token is never a target, whatever the mask says
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 40), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy_term(hidden, weight, ids, mask), expected)


def test_ce_term_with_no_target_is_zero_and_finite():
    hidden, weight, ids, _ = _ce_case()
    loss = cross_entropy_term(hidden, weight, ids, torch.zeros(2, 9))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_ce_term_shape_errors():
    hidden, weight, ids, _ = _ce_case()
    with pytest.raises(ValueError, match="loss_mask"):
        cross_entropy_term(hidden, weight, ids, torch.ones(2, 8))
    with pytest.raises(ValueError, match="input_ids"):
        cross_entropy_term(hidden, weight, ids[:, :-1])


def test_ce_term_of_a_one_token_chunk_is_zero_and_differentiable():
    hidden, weight = _leaf(2, 1, 8), _leaf(40, 8)
    loss = cross_entropy_term(hidden, weight, torch.zeros(2, 1, dtype=torch.long))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
