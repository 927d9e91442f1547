"""The EBFT update on a fixed block grid with unused blocks (answer anchors) and flat groups left out:
what unused blocks contribute (nothing), that they are nobody's leave-one-out partner, and the policy
gradient's token mean against slow references written with loops."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ebft.config import EBFTSettings, SamplingSettings
from ebft.core.compat import lm_head
from ebft.core.layout import StridedLayout
from ebft.core.strided import strided_hidden
from ebft.models.loading import build_tiny_model
from ebft.objectives.baselines import FLAT_TOLERANCE, flat_groups
from ebft.objectives.ebft_update import ebft_update
from ebft.objectives.losses import token_logprobs

B, N, D = 2, 4, 12
LAYOUT = StridedLayout(16, 2, 3, 3, N)           # NB = 4
NB, G = LAYOUT.num_blocks, LAYOUT.gen_len
USED = torch.tensor([[True, False, True, True], [False, False, True, False]])


def method(**kwargs) -> EBFTSettings:
    return EBFTSettings(SamplingSettings(N, 0.7), **{"alpha": 1.0, "gamma": 0.0, "whitening": "none", **kwargs})


@pytest.fixture(scope="module")
def rollout():
    """A tiny generator, strided rows of random tokens and random unit features."""
    model = build_tiny_model(vocab_size=64, num_layers=2, hidden=32, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (B, LAYOUT.seq_len), generator=g)
    tokens = torch.randint(0, 64, (B, N, NB, G), generator=g)
    row = LAYOUT.scatter_generated(ids, tokens)
    gen = F.normalize(torch.randn(B, NB, N, D, generator=g), dim=-1)
    gt = F.normalize(torch.randn(B, NB, D, generator=g), dim=-1)
    return model, row, tokens, gen, gt


def update(rollout, settings, gen=None, gt=None, used=USED):
    model, row, tokens, gen0, gt0 = rollout
    return ebft_update(model, LAYOUT, row, tokens, gen0 if gen is None else gen, gt0 if gt is None else gt,
                       settings, torch.ones(B, LAYOUT.seq_len, dtype=torch.bool), used)


def slow_pg(rollout, advantages, counted, temperature):
    """Token mean of ``-A log p`` per (chunk, sample) row over the counted blocks' tokens, then the mean
    over rows with a counted token (loops; the log-probs from the strided forward)."""
    model, row, *_ = rollout
    head = lm_head(model)
    with torch.no_grad():
        hidden = strided_hidden(model, row, LAYOUT)
        logp = token_logprobs(hidden[:, LAYOUT.score_index], head.weight, row[:, LAYOUT.token_index], temperature)
    rows = []
    for b in range(B):
        for j in range(N):
            terms = [-advantages[b, j, k] * logp[b, j, k, g] for k in range(NB) if counted[b, k] for g in range(G)]
            if terms:
                rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


@pytest.mark.parametrize("baseline", ["rloo_corrected", "rloo", "group_norm", "reinforce"])
def test_unused_blocks_get_no_reward_advantage_or_weight(rollout, baseline):
    settings = method(baseline=baseline, anchors="answer")
    loss, stats = update(rollout, settings)
    _, full = update(rollout, settings, used=None)
    unused = ~USED
    for part in (stats.rewards.alignment, stats.rewards.diversity, stats.rewards.reward):
        assert (part[unused] == 0).all()
    assert (stats.advantages.transpose(1, 2)[unused] == 0).all()
    # the used blocks' advantages are those of the unmasked update: every baseline is within one block
    torch.testing.assert_close(stats.advantages.transpose(1, 2)[USED], full.advantages.transpose(1, 2)[USED])
    torch.testing.assert_close(loss.detach(), slow_pg(rollout, stats.advantages, USED, 0.7))
    assert stats.metrics()["train/blocks_used"].item() == pytest.approx(USED.float().mean().item())


def test_unused_blocks_are_nobodys_leave_one_out_partner(rollout):
    """Other features in the unused blocks change neither a used block's advantage nor the loss."""
    *_, gen, gt = rollout
    settings = method(anchors="answer")
    loss, stats = update(rollout, settings)
    noise = torch.Generator().manual_seed(9)
    gen2, gt2 = gen.clone(), gt.clone()
    gen2[~USED] = F.normalize(torch.randn(gen2[~USED].shape, generator=noise), dim=-1)
    gt2[~USED] = F.normalize(torch.randn(gt2[~USED].shape, generator=noise), dim=-1)
    loss2, stats2 = update(rollout, settings, gen2, gt2)
    assert torch.equal(loss, loss2) and torch.equal(stats.advantages, stats2.advantages)
    assert stats.metrics()["train/cfm"] == stats2.metrics()["train/cfm"]


def test_answer_anchors_take_the_ce_over_answers(rollout):
    model, row, tokens, gen, gt = rollout
    answers = torch.rand(B, LAYOUT.seq_len, generator=torch.Generator().manual_seed(3)) < 0.5
    for anchors, expected_mask in (("answer", answers), ("all", None)):
        settings = method(anchors=anchors, gamma=1.0, rl_coef=0.0)
        loss, _ = ebft_update(model, LAYOUT, row, tokens, gen, gt, settings, answers,
                              USED if anchors == "answer" else None)
        head = lm_head(model)
        with torch.no_grad():
            hidden = strided_hidden(model, row, LAYOUT)[:, :LAYOUT.seq_len]
            nll = -token_logprobs(hidden[:, :-1], head.weight, row[:, 1:LAYOUT.seq_len])
        weights = torch.ones_like(nll) if expected_mask is None else expected_mask[:, 1:].float()
        torch.testing.assert_close(loss.detach(), (nll * weights).sum() / weights.sum())


def slow_flat(rewards):
    """All n rewards of a group equal (up to the relative tolerance), with loops."""
    out = []
    for group in rewards.reshape(-1, rewards.shape[-1]).tolist():
        scale = max(1.0, max(abs(r) for r in group))
        out.append(all(abs(a - b) <= FLAT_TOLERANCE * scale for a in group for b in group))
    return torch.tensor(out).reshape(rewards.shape[:-1])


def test_flat_groups_on_hand_worked_rewards():
    rewards = torch.tensor([[0.5, 0.5, 0.5, 0.5],          # flat
                            [0.5, 0.5, 0.5, 0.6],          # not
                            [3.0, 3.0 + 1e-6, 3.0, 3.0],   # flat: 1e-6 <= 1e-6 * 3
                            [0.0, 1e-5, 0.0, 0.0],         # not: 1e-5 > 1e-6 * 1
                            [-2.0, -2.0, -2.0, -2.0]])     # flat
    assert flat_groups(rewards).tolist() == [True, False, True, False, True]
    assert torch.equal(flat_groups(rewards), slow_flat(rewards))
    noisy = torch.randn(3, 5, 4).round(decimals=1)
    noisy[0, 1] = noisy[0, 1, :1]
    assert torch.equal(flat_groups(noisy), slow_flat(noisy))


@pytest.mark.parametrize("used", [None, USED])
def test_skip_flat_groups_leaves_them_out_of_the_policy_gradient(rollout, used):
    """Blocks whose n samples are identical have n equal rewards: with skip_flat_groups their tokens
    leave the token mean, counted in train/flat_groups; without, they stay (with zero advantage)."""
    *_, gen, gt = rollout
    gen = gen.clone()
    flat = torch.zeros(B, NB, dtype=torch.bool)
    flat[0, 2] = flat[1, 0] = True
    gen[flat] = gen[flat][:, :1].expand(-1, N, -1)
    plain = method(baseline="rloo", anchors="all" if used is None else "answer")
    skipping = dataclasses.replace(plain, skip_flat_groups=True)
    loss, stats = update(rollout, plain, gen, gt, used)
    skipped, stats_skip = update(rollout, skipping, gen, gt, used)
    counted = torch.ones(B, NB, dtype=torch.bool) if used is None else used
    assert stats.advantages.transpose(1, 2)[flat].abs().max() < 1e-6
    torch.testing.assert_close(loss.detach(), slow_pg(rollout, stats.advantages, counted, 0.7))
    torch.testing.assert_close(skipped.detach(), slow_pg(rollout, stats.advantages, counted & ~flat, 0.7))
    expected = (flat & counted).sum() / counted.sum()
    assert stats_skip.metrics()["train/flat_groups"].item() == pytest.approx(expected.item())
