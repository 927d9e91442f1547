"""Feature-matching rewards: closed forms, whitening lemmas (paper §B.4) and the authors' variant."""

import math

import pytest
import torch
import torch.nn.functional as F

from ebft.objectives.rewards import feature_matching_rewards, whiten_features

E = torch.eye(4)


def _cos(a, b):
    na, nb = a.norm(), b.norm()
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _slow_alignment_diversity(white_gen, white_gt):
    """AT_j = 2 cos(phi~_j, psi~_j), DT_j = 2/(n-1) sum_{j' != j} phi~_j . phi~_j', by loops."""
    n = white_gen.shape[0]
    at = torch.tensor([2 * _cos(white_gen[j], white_gt[j]) for j in range(n)], dtype=torch.float64)
    dt = torch.tensor([2 / (n - 1) * sum(float(white_gen[j] @ white_gen[k]) for k in range(n) if k != j)
                       if n > 1 else 0.0 for j in range(n)], dtype=torch.float64)
    return at, dt


def _slow_reference(gen, gt):
    """The authors' recipe for one group, literally, in fp64: W = U S^-1 U^T, W X, W [psi; ...; psi]."""
    x = gen.double()
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    keep = s > 1e-5 * s.max()
    w = u[:, keep] @ torch.diag(1 / s[keep]) @ u[:, keep].T
    return _slow_alignment_diversity(w @ x, w @ gt.double().expand_as(x))


def _slow_paper(gen, gt):
    """Eq. 8 with an explicit D x D second moment and its pseudo-inverse square root (eigh), fp64."""
    x = gen.double()
    n = x.shape[0]
    evals, evecs = torch.linalg.eigh(x.T @ x / n)
    keep = evals > (1e-5) ** 2 * evals.max()
    root = evecs[:, keep] @ torch.diag(evals[keep].rsqrt()) @ evecs[:, keep].T
    return _slow_alignment_diversity(x @ root, (root @ gt.double()).expand_as(x))


def _assert_rewards_close(rewards, at, dt, alpha, atol=1e-5):
    torch.testing.assert_close(rewards.alignment.double(), at, atol=atol, rtol=0)
    torch.testing.assert_close(rewards.diversity.double(), dt, atol=atol, rtol=0)
    torch.testing.assert_close(rewards.reward.double(), at - alpha * dt, atol=atol, rtol=0)


# ---- no whitening: closed forms ---------------------------------------------------------------

def test_none_orthogonal_pair_psi_equal_to_one_sample():
    r = feature_matching_rewards(E[:2], E[0], alpha=1.0, whitening="none")
    torch.testing.assert_close(r.alignment, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(r.diversity, torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(r.reward, torch.tensor([2.0, 0.0]))


def test_none_duplicate_pair_is_penalised_by_its_dot_product():
    gen = torch.stack([E[0], E[0]])
    r = feature_matching_rewards(gen, E[1], alpha=0.5, whitening="none")
    torch.testing.assert_close(r.alignment, torch.zeros(2))
    torch.testing.assert_close(r.diversity, torch.tensor([2.0, 2.0]))  # 2/(n-1) * 1
    torch.testing.assert_close(r.reward, torch.tensor([-1.0, -1.0]))


def test_none_three_samples_hand_values():
    diag = (E[0] + E[1]) / math.sqrt(2)
    r = feature_matching_rewards(torch.stack([E[0], E[1], diag]), E[0], alpha=1.0, whitening="none")
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(r.alignment, torch.tensor([2.0, 0.0, 2 * s]))
    torch.testing.assert_close(r.diversity, torch.tensor([s, s, 2 * s]))  # 2/2 * sum of dots


def test_none_alignment_is_a_cosine_but_diversity_uses_raw_dot_products():
    gen, gt = torch.randn(4, 8), torch.randn(8)
    base = feature_matching_rewards(gen, gt, alpha=1.0, whitening="none")
    scaled = feature_matching_rewards(3 * gen, 5 * gt, alpha=1.0, whitening="none")
    torch.testing.assert_close(scaled.alignment, base.alignment)
    torch.testing.assert_close(scaled.diversity, 9 * base.diversity)


def test_single_sample_has_no_diversity():
    gen, gt = torch.randn(3, 1, 8), torch.randn(3, 8)
    for whitening in ("none", "reference", "paper"):
        r = feature_matching_rewards(gen, gt, alpha=1.0, whitening=whitening)
        assert torch.equal(r.diversity, torch.zeros(3, 1))
    cos = F.cosine_similarity(gen[:, 0], gt, dim=-1)
    # one sample: the reference whitening only rescales sample and ground truth (by 1/|phi| > 0) ...
    reference = feature_matching_rewards(gen, gt, alpha=1.0, whitening="reference")
    torch.testing.assert_close(reference.alignment[:, 0], 2 * cos)
    # ... while eq. 8 projects the ground truth onto the span of the samples: cos = +-1
    paper = feature_matching_rewards(gen, gt, alpha=1.0, whitening="paper")
    torch.testing.assert_close(paper.alignment[:, 0], 2 * torch.sign(cos))


# ---- whitening: lemma B.2 and the authors' n-times-smaller penalty ----------------------------

@pytest.mark.parametrize("n,d", [(4, 16), (3, 3)])
def test_whitened_distinct_rollouts_are_orthonormal(n, d):
    gen, gt = torch.randn(5, n, d), torch.randn(5, d)
    white, _ = whiten_features(gen, gt, "reference")
    torch.testing.assert_close(white @ white.transpose(-1, -2), torch.eye(n).expand(5, n, n), atol=1e-5, rtol=0)
    white, _ = whiten_features(gen, gt, "paper")  # (Sigma^+)^(1/2) with Sigma = X^T X / n: gram = n I
    torch.testing.assert_close(white @ white.transpose(-1, -2), n * torch.eye(n).expand(5, n, n), atol=1e-4, rtol=0)
    for whitening in ("reference", "paper"):
        r = feature_matching_rewards(gen, gt, alpha=1.0, whitening=whitening)
        torch.testing.assert_close(r.diversity, torch.zeros(5, n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("multiplicity,reference_dt,paper_dt", [
    (2, 1 / 3, 4 / 3),   # n = 4, samples a, a, b, c
    (3, 4 / 9, 16 / 9),  # n = 4, samples a, a, a, b
])
def test_duplicates_get_exactly_the_stated_penalties(multiplicity, reference_dt, paper_dt):
    n = 4
    base = torch.randn(n, 32)
    gen = torch.cat([base[:1].expand(multiplicity, -1), base[1:n - multiplicity + 1]])
    gt = torch.randn(32)
    # eq. 48: DT_j = 2 (1 - 1/m) / (1 - 1/n) for a sample of multiplicity m; unique samples get 0
    assert paper_dt == pytest.approx(2 * (1 - 1 / multiplicity) / (1 - 1 / n))
    assert reference_dt == pytest.approx(paper_dt / n)
    expected = torch.zeros(n)
    expected[:multiplicity] = 1.0
    ref = feature_matching_rewards(gen, gt, alpha=1.0, whitening="reference")
    paper = feature_matching_rewards(gen, gt, alpha=1.0, whitening="paper")
    torch.testing.assert_close(ref.diversity, reference_dt * expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(paper.diversity, paper_dt * expected, atol=1e-5, rtol=0)


def test_paper_alignment_when_psi_equals_one_sample():
    # Lemma B.2 / eq. 47: the whitened ground truth is orthogonal to every other whitened sample,
    # and equals the whitened copy of itself, so the normalised alignment is 2 there and 0 elsewhere.
    gen = torch.randn(4, 16)
    gen[1] = gen[0]
    r = feature_matching_rewards(gen, gen[2].clone(), alpha=1.0, whitening="paper")
    torch.testing.assert_close(r.alignment, torch.tensor([0.0, 0.0, 2.0, 0.0]), atol=1e-5, rtol=0)


# ---- agreement with slow, literal implementations --------------------------------------------

def _groups():
    rng = torch.Generator().manual_seed(1)
    distinct = torch.randn(4, 12, generator=rng)
    duplicated = distinct.clone()
    duplicated[3] = duplicated[1]
    low_rank = torch.randn(4, 2, generator=rng) @ torch.randn(2, 12, generator=rng)
    return [distinct, duplicated, low_rank]


@pytest.mark.parametrize("case", range(3))
def test_reference_matches_the_authors_recipe(case):
    gen, gt = _groups()[case], torch.randn(12)
    at, dt = _slow_reference(gen, gt)
    _assert_rewards_close(feature_matching_rewards(gen, gt, alpha=0.5, whitening="reference"), at, dt, 0.5)


@pytest.mark.parametrize("case", range(3))
def test_paper_matches_a_direct_d_by_d_computation(case):
    gen, gt = _groups()[case], torch.randn(12)
    at, dt = _slow_paper(gen, gt)
    _assert_rewards_close(feature_matching_rewards(gen, gt, alpha=0.5, whitening="paper"), at, dt, 0.5, atol=1e-4)


def test_paper_matches_direct_computation_with_more_samples_than_dimensions():
    gen, gt = torch.randn(6, 3), torch.randn(3)
    at, dt = _slow_paper(gen, gt)
    _assert_rewards_close(feature_matching_rewards(gen, gt, alpha=1.0, whitening="paper"), at, dt, 1.0, atol=1e-4)


@pytest.mark.parametrize("whitening", ["none", "reference", "paper"])
def test_batched_call_equals_a_loop_over_groups(whitening):
    gen, gt = torch.randn(2, 3, 4, 10), torch.randn(2, 3, 10)
    gen[1, 2, 3] = gen[1, 2, 0]  # one group with a duplicate
    batched = feature_matching_rewards(gen, gt, alpha=0.5, whitening=whitening)
    for b in range(2):
        for k in range(3):
            single = feature_matching_rewards(gen[b, k], gt[b, k], alpha=0.5, whitening=whitening)
            for field in ("alignment", "diversity", "reward"):
                torch.testing.assert_close(getattr(batched, field)[b, k], getattr(single, field),
                                           atol=1e-5, rtol=0)


# ---- degenerate inputs and dtypes ---------------------------------------------------------------

@pytest.mark.parametrize("whitening", ["none", "reference", "paper"])
def test_all_zero_inputs_give_zero_rewards(whitening):
    r = feature_matching_rewards(torch.zeros(2, 4, 8), torch.zeros(2, 8), alpha=1.0, whitening=whitening)
    for field in ("alignment", "diversity", "reward"):
        assert torch.equal(getattr(r, field), torch.zeros(2, 4))


@pytest.mark.parametrize("whitening", ["none", "reference", "paper"])
def test_rank_deficient_and_partly_zero_groups_stay_finite(whitening):
    gen = torch.zeros(3, 4, 8)
    gen[0] = torch.randn(1, 8).expand(4, 8)        # rank 1, all samples identical
    gen[1, :2] = torch.randn(2, 8)                 # two zero samples
    gen[2] = torch.randn(4, 1) @ torch.randn(1, 8)  # rank 1, different scales and signs
    gt = torch.randn(3, 8)
    gt[1] = 0
    r = feature_matching_rewards(gen, gt, alpha=1.0, whitening=whitening)
    for field in ("alignment", "diversity", "reward"):
        assert torch.isfinite(getattr(r, field)).all()
    assert torch.equal(r.alignment[1], torch.zeros(4))  # zero ground truth: cosine 0


def test_identical_samples_reference_penalty():
    # n identical samples: a single direction of weight 1/n each, DT_j = 2/(n-1) * (n-1)/n = 2/n
    gen = torch.randn(1, 8).expand(4, 8)
    r = feature_matching_rewards(gen, torch.randn(8), alpha=1.0, whitening="reference")
    torch.testing.assert_close(r.diversity, torch.full((4,), 0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("whitening", ["none", "reference", "paper"])
def test_any_input_dtype_is_computed_in_fp32(dtype, whitening):
    gen, gt = torch.randn(3, 4, 16).to(dtype), torch.randn(3, 16).to(dtype)
    r = feature_matching_rewards(gen, gt, alpha=1.0, whitening=whitening)
    expected = feature_matching_rewards(gen.float(), gt.float(), alpha=1.0, whitening=whitening)
    for field in ("alignment", "diversity", "reward"):
        assert getattr(r, field).dtype == torch.float32
        torch.testing.assert_close(getattr(r, field), getattr(expected, field))


def test_rewards_carry_no_autograd_graph():
    gen = torch.randn(2, 4, 8, requires_grad=True)
    r = feature_matching_rewards(gen, torch.randn(2, 8), alpha=1.0)
    assert not r.reward.requires_grad


# ---- SVD failure fallbacks (as the authors: retry with noise, then unwhitened) -----------------

def _failing_svd(monkeypatch, fail_calls):
    original = torch.linalg.svd
    calls = []

    def svd(*args, **kwargs):
        calls.append(1)
        if len(calls) in fail_calls:
            raise torch.linalg.LinAlgError("forced failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


def test_failed_batched_svd_falls_back_to_groups(monkeypatch):
    gen, gt = torch.randn(3, 4, 8), torch.randn(3, 8)
    expected = feature_matching_rewards(gen, gt, alpha=1.0)
    calls = _failing_svd(monkeypatch, fail_calls={1})
    r = feature_matching_rewards(gen, gt, alpha=1.0)
    assert len(calls) == 4  # one batched call, then one per group
    torch.testing.assert_close(r.reward, expected.reward)


def test_failed_group_svd_is_retried_with_noise(monkeypatch):
    gen, gt = torch.randn(1, 4, 8), torch.randn(1, 8)
    expected = feature_matching_rewards(gen, gt, alpha=1.0)
    calls = _failing_svd(monkeypatch, fail_calls={1, 2})
    r = feature_matching_rewards(gen, gt, alpha=1.0)
    assert len(calls) == 3
    torch.testing.assert_close(r.reward, expected.reward, atol=1e-4, rtol=0)


@pytest.mark.parametrize("whitening", ["reference", "paper"])
def test_svd_failing_everywhere_leaves_the_group_unwhitened(monkeypatch, whitening):
    gen, gt = torch.randn(2, 4, 8), torch.randn(2, 8)
    expected = feature_matching_rewards(gen, gt, alpha=1.0, whitening="none")
    _failing_svd(monkeypatch, fail_calls=set(range(1, 100)))
    r = feature_matching_rewards(gen, gt, alpha=1.0, whitening=whitening)
    torch.testing.assert_close(r.reward, expected.reward)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(whitening="zca"), "whitening='zca'"),
    (dict(alpha=-0.5), "alpha=-0.5"),
    (dict(alpha=float("nan")), "alpha=nan"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(gen=torch.randn(4, 8), gt=torch.randn(8), alpha=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        feature_matching_rewards(**args)


def test_bad_shapes_and_values_are_named():
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        feature_matching_rewards(torch.randn(2, 4, 8), torch.randn(3, 8), alpha=1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        feature_matching_rewards(torch.full((4, 8), float("nan")), torch.randn(8), alpha=1.0)
