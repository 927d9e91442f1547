"""RLOO baseline of paper eq. 94 (independence, unbiasedness, zero-sum) and GRPO normalisation."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ebft.objectives.baselines import fm_advantages, group_normalized_advantages, rloo_advantages, rloo_baseline
from ebft.objectives.rewards import FMRewards, feature_matching_rewards


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).float()


def _eq93_baseline(phi, psi, alpha):
    """Eq. 94 first line with eq. 93 written out: mean over j' != j of T1_j' - alpha * T2^(j', j),
    where T2^(j', j) averages phi_j'' . phi_j' over j'' not in {j', j} (loops, fp64)."""
    phi, psi = phi.double(), psi.double()
    n = phi.shape[0]
    out = []
    for j in range(n):
        total = 0.0
        for jp in range(n):
            if jp == j:
                continue
            t1 = 2 * float(phi[jp] @ psi)
            others = [k for k in range(n) if k not in (j, jp)]
            t2 = 2 / (n - 2) * sum(float(phi[k] @ phi[jp]) for k in others) if others else 0.0
            total += t1 - alpha * t2
        out.append(total / (n - 1))
    return torch.tensor(out, dtype=torch.float64)


def test_hand_values():
    at, dt = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 1.5])
    # b_j = (sum AT - AT_j)/2 - alpha * (sum DT - 2 DT_j)/1
    torch.testing.assert_close(rloo_baseline(at, dt, alpha=1.0), torch.tensor([0.5, 1.0, 1.5]))
    torch.testing.assert_close(rloo_baseline(at, dt, alpha=0.5), torch.tensor([1.5, 1.5, 1.5]))
    torch.testing.assert_close(rloo_baseline(at, dt, alpha=0.0), torch.tensor([2.5, 2.0, 1.5]))


@pytest.mark.parametrize("n", [3, 4, 6])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_matches_the_leave_two_out_definition(n, alpha):
    phi, psi = _unit(n, 5), _unit(5)
    r = feature_matching_rewards(phi, psi, alpha=alpha, whitening="none")
    torch.testing.assert_close(rloo_baseline(r.alignment, r.diversity, alpha).double(),
                               _eq93_baseline(phi, psi, alpha), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_baseline_of_a_sample_ignores_that_sample(n):
    phi, psi = torch.randn(n, 6), torch.randn(6)
    before = feature_matching_rewards(phi, psi, alpha=1.0, whitening="none")
    moved = phi.clone()
    moved[1] = torch.randn(6)
    after = feature_matching_rewards(moved, psi, alpha=1.0, whitening="none")
    b_before = rloo_baseline(before.alignment, before.diversity, 1.0)
    b_after = rloo_baseline(after.alignment, after.diversity, 1.0)
    torch.testing.assert_close(b_after[1], b_before[1], atol=1e-5, rtol=0)
    others = [j for j in range(n) if j != 1]
    assert (b_after[others] - b_before[others]).abs().min() > 1e-3
    # the naive leave-one-out mean of the rewards does depend on the sample it is used for
    naive = lambda r: (r.reward.sum() - r.reward) / (n - 1)  # noqa: E731
    assert (naive(after)[1] - naive(before)[1]).abs() > 1e-3


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_advantages_sum_to_zero_per_group(n):
    r = feature_matching_rewards(torch.randn(3, n, 8), torch.randn(3, 8), alpha=0.0, whitening="none")
    torch.testing.assert_close(rloo_advantages(r, 0.0).sum(-1), torch.zeros(3), atol=1e-5, rtol=0)
    if n > 2:  # eq. 94 keeps the sum at zero for any alpha
        torch.testing.assert_close(rloo_advantages(r, 0.7).sum(-1), torch.zeros(3), atol=1e-5, rtol=0)


def test_advantages_are_reward_minus_baseline_for_the_same_alpha():
    r = feature_matching_rewards(torch.randn(2, 4, 8), torch.randn(2, 8), alpha=0.5, whitening="reference")
    torch.testing.assert_close(rloo_advantages(r, 0.5), r.reward - rloo_baseline(r.alignment, r.diversity, 0.5))


def test_two_samples_have_no_diversity_baseline():
    at, dt = torch.tensor([0.3, 1.1]), torch.tensor([0.8, 0.8])
    torch.testing.assert_close(rloo_baseline(at, dt, alpha=1.0), torch.tensor([1.1, 0.3]))
    adv = rloo_advantages(FMRewards(at, dt, at - dt), alpha=1.0)
    torch.testing.assert_close(adv, torch.tensor([0.3 - 1.1 - 0.8, 1.1 - 0.3 - 0.8]))


def test_single_sample_is_plain_reinforce():
    r = FMRewards(torch.tensor([[0.4], [1.2]]), torch.zeros(2, 1), torch.tensor([[0.4], [1.2]]))
    assert torch.equal(rloo_baseline(r.alignment, r.diversity, 1.0), torch.zeros(2, 1))
    assert torch.equal(rloo_advantages(r, 1.0), r.reward)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_rloo_estimate_is_unbiased_by_exact_enumeration(n, alpha):
    """E[-(1/n) sum_j grad log p(y_j) A_j] over all n-tuples equals the gradient of
    alpha * |E phi - psi / alpha|^2 (eqs. 64, 92), for a softmax policy over K outcomes."""
    k = 3
    feats, psi = _unit(k, 4).double(), _unit(4).double()
    theta = torch.randn(k, dtype=torch.float64, requires_grad=True)
    p = theta.softmax(-1)
    mean_phi = p @ feats
    (alpha * mean_phi @ mean_phi - 2 * mean_phi @ psi).backward()  # eq. 64 without its constant
    tuples = torch.tensor(list(itertools.product(range(k), repeat=n)))
    rewards = feature_matching_rewards(feats[tuples], psi.expand(len(tuples), -1), alpha, whitening="none")
    p = p.detach()
    prob = p[tuples].prod(-1)
    score = F.one_hot(tuples, k).double() - p  # grad_theta log p(y) for a softmax policy

    def expected_gradient(advantages):
        per_tuple = -(score * advantages.double().unsqueeze(-1)).mean(1)
        return (prob.unsqueeze(-1) * per_tuple).sum(0)

    torch.testing.assert_close(expected_gradient(rloo_advantages(rewards, alpha)), theta.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(expected_gradient(fm_advantages(rewards, alpha, "reinforce")), theta.grad,
                               atol=1e-5, rtol=0)                 # no baseline: unbiased too (more variance)
    plain = expected_gradient(fm_advantages(rewards, alpha, "rloo"))
    if alpha > 0:   # plain leave-one-out: DT_j' of the others holds phi_j . phi_j', a bias
        assert (plain - theta.grad).abs().max() > 1e-3
    else:           # without the pairwise term it is unbiased
        torch.testing.assert_close(plain, theta.grad, atol=1e-5, rtol=0)


def _slow_advantages(at: list[float], dt: list[float], alpha: float, baseline: str) -> list[float]:
    """The four baselines written out with loops, from their definitions."""
    n = len(at)
    r = [a - alpha * d for a, d in zip(at, dt)]
    if baseline == "reinforce":
        return r
    if baseline == "rloo":
        return [r[j] - sum(r[i] for i in range(n) if i != j) / (n - 1) for j in range(n)]
    if baseline == "group_norm":
        mean = sum(r) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (n - 1))
        return [(x - mean) / (std + 1e-4) for x in r]
    out = []
    for j in range(n):   # eq. 94 term by term
        others = [i for i in range(n) if i != j]
        b = sum(at[i] for i in others) / (n - 1)
        if n > 2:
            b -= alpha * (sum(dt[i] for i in others) - dt[j]) / (n - 2)
        out.append(r[j] - b)
    return out


@pytest.mark.parametrize("baseline", ["rloo_corrected", "rloo", "group_norm", "reinforce"])
def test_each_baseline_matches_its_definition_on_hand_numbers(baseline):
    at, dt = [1.0, 2.0, 3.0, 0.5], [0.5, 1.0, 1.5, 0.25]
    rewards = FMRewards(torch.tensor(at), torch.tensor(dt), torch.tensor(at) - 0.5 * torch.tensor(dt))
    expected = torch.tensor(_slow_advantages(at, dt, 0.5, baseline))
    torch.testing.assert_close(fm_advantages(rewards, 0.5, baseline), expected)
    if baseline == "rloo":   # r = [0.75, 1.5, 2.25, 0.375]: A_0 = 0.75 - (1.5 + 2.25 + 0.375) / 3
        assert fm_advantages(rewards, 0.5, baseline)[0].item() == pytest.approx(0.75 - 4.125 / 3)


def test_baselines_other_than_reinforce_need_two_samples():
    one = FMRewards(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1))
    torch.testing.assert_close(fm_advantages(one, 0.0, "reinforce"), torch.ones(2, 1))
    for baseline in ("rloo_corrected", "rloo", "group_norm"):
        with pytest.raises(ValueError, match=f"baseline={baseline} needs n >= 2 .*baseline=reinforce"):
            fm_advantages(one, 0.0, baseline)
    with pytest.raises(ValueError, match="not one of"):
        fm_advantages(one, 0.0, "ppo")


def test_baseline_errors_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        rloo_baseline(torch.zeros(4), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="alpha=-1"):
        rloo_baseline(torch.zeros(4), torch.zeros(4), -1)


# ---- GRPO group normalisation ---------------------------------------------------------------------

def test_group_scaling_closed_form():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
    std0, std1 = math.sqrt(5 / 3), math.sqrt(1 / 3)  # unbiased
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [-0.5, -0.5, 0.5, 0.5]])
    expected = expected / torch.tensor([[std0 + 1e-4], [std1 + 1e-4]])
    torch.testing.assert_close(group_normalized_advantages(r), expected)


def test_batch_and_no_scaling():
    r = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    centred = torch.tensor([[-0.5, 0.5], [-1.0, 1.0]])
    torch.testing.assert_close(group_normalized_advantages(r, "none"), centred)
    std = float(torch.tensor([1.0, 2.0, 3.0, 5.0]).std())
    torch.testing.assert_close(group_normalized_advantages(r, "batch"), centred / (std + 1e-4))


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_equal_rewards_and_single_samples_give_zero_advantages(scale):
    assert torch.equal(group_normalized_advantages(torch.full((3, 4), 0.7), scale), torch.zeros(3, 4))
    assert torch.equal(group_normalized_advantages(torch.tensor([[0.2], [0.9]]), scale), torch.zeros(2, 1))
    assert torch.equal(group_normalized_advantages(torch.tensor([0.5]), scale), torch.zeros(1))


def test_group_normalisation_errors():
    with pytest.raises(ValueError, match="scale_rewards='std'"):
        group_normalized_advantages(torch.zeros(2, 4), "std")
    with pytest.raises(ValueError, match="eps=0"):
        group_normalized_advantages(torch.zeros(2, 4), eps=0)
