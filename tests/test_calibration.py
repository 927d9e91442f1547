"""Calibration metrics: the CFM estimator against exact values, held-out CE against a direct
computation, the strided CFM pipeline against explicit sequences, the FM profile's contexts."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ebft.eval.calibration import (Estimate, chunk_nll, context_fm, fixed_subset, fm_profile, profile_layouts,
                                   validation_ce)
from ebft.models.features import FeatureNetwork
from ebft.objectives.rewards import cfm_estimate, whitened_fm_proxy
from ebft.core.layout import StridedLayout

# A toy "model": K outcomes with probabilities p and feature vectors f_k; ground truth psi.
P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
FEATURES = torch.tensor([[1.0, 0.0, 0.5, -1.0], [0.2, 1.0, -0.3, 0.0], [-0.7, 0.4, 1.0, 0.6]], dtype=torch.float64)
PSI = torch.tensor([0.3, -0.2, 0.8, 0.1], dtype=torch.float64)
EXACT = ((P @ FEATURES - PSI) ** 2).sum().item()   # ||E phi - psi||^2


@pytest.mark.parametrize("n", [2, 3, 4])
def test_cfm_expectation_by_enumeration_is_exact(n):
    """E[estimate] over all K^n sample tuples, weighted by their probability, is ||E phi - psi||^2."""
    tuples = torch.tensor(list(itertools.product(range(len(P)), repeat=n)))
    weights = P[tuples].prod(-1)
    estimates = cfm_estimate(FEATURES[tuples], PSI.expand(len(tuples), -1)).double()
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights * estimates).sum().item() == pytest.approx(EXACT, rel=1e-6)


def test_cfm_monte_carlo_mean_matches_exact():
    n, draws = 4, 40000
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(P.float().expand(draws, -1), n, replacement=True, generator=generator)
    estimates = cfm_estimate(FEATURES[samples], PSI.expand(draws, -1)).double()
    se = estimates.std().item() / math.sqrt(draws)
    assert abs(estimates.mean().item() - EXACT) < 4 * se
    # the plug-in ||mean phi - psi||^2 is biased upwards by Var/n: the unbiased estimator is not that
    plug_in = ((FEATURES[samples].mean(1) - PSI) ** 2).sum(-1).mean().item()
    assert plug_in - EXACT > 10 * se


def test_cfm_needs_two_samples():
    with pytest.raises(ValueError, match="n >= 2"):
        cfm_estimate(torch.randn(1, 4), torch.randn(4))


def test_unwhitened_proxy_equals_cfm_for_unit_features():
    gen = F.normalize(torch.randn(5, 4, 16), dim=-1)
    gt = F.normalize(torch.randn(5, 16), dim=-1)
    assert torch.allclose(whitened_fm_proxy(gen, gt, "none"), cfm_estimate(gen, gt), atol=1e-5)
    assert not torch.allclose(whitened_fm_proxy(gen, gt, "reference"), cfm_estimate(gen, gt), atol=1e-3)


def test_estimate_se_is_over_chunk_means():
    values = torch.tensor([[1.0, 3.0], [2.0, 2.0], [6.0, 4.0]])   # chunk means 2, 2, 5
    est = Estimate.of(values)
    assert est.mean == pytest.approx(3.0)
    assert est.se == pytest.approx(torch.tensor([2.0, 2.0, 5.0]).std().item() / math.sqrt(3))
    assert math.isnan(Estimate.of(values[:1]).se)


def test_fixed_subset_is_sorted_and_seeded():
    a, b = fixed_subset(50, 10, seed=1), fixed_subset(50, 10, seed=1)
    assert torch.equal(a, b) and len(a) == 10 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10
    assert not torch.equal(a, fixed_subset(50, 10, seed=2))
    assert torch.equal(fixed_subset(7, None, 0), torch.arange(7))
    assert torch.equal(fixed_subset(7, 9, 0), torch.arange(7))
    with pytest.raises(ValueError, match="held-out split is empty"):
        fixed_subset(0, 5, 0)


def test_validation_ce_is_token_weighted(tiny_model):
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[0, 3:] = True       # many answer tokens in chunk 0, one in chunk 3, none elsewhere
    mask[3, 7] = True
    with torch.no_grad():
        nll = F.cross_entropy(tiny_model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    sums = chunk_nll(tiny_model, ids, mask, batch_size=2, progress=False)
    got = validation_ce(sums)
    assert got["ce"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert got["ce_answer"] == pytest.approx(nll[mask[:, 1:]].mean().item(), rel=1e-5)
    # per chunk: the sums behind the paired CE comparison
    assert torch.allclose((sums[:, 0] / sums[:, 1]).float(), nll.mean(-1), rtol=1e-5)
    assert sums[:, 3].tolist() == [9.0, 0.0, 0.0, 1.0, 0.0]
    assert math.isnan(validation_ce(chunk_nll(tiny_model, ids, torch.zeros_like(mask), progress=False))["ce_answer"])


def greedy_continuation(model, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prefix.clone()
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids[None]).logits[0, -1].argmax().view(1)])
    return ids[len(prefix):]


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_context_fm_with_greedy_samples_is_the_feature_distance(tiny_model, pooling):
    """With temperature 0 the n samples coincide, so the estimate is ||phi(c:greedy) - phi(c:y)||^2 per
    context; computed here from explicit sequences, one context at a time."""
    feature_network = FeatureNetwork(tiny_model, layers=(0.5, 1.0), pooling=pooling)
    layout = StridedLayout(16, 4, 4, 3, 3)
    chunks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    cfm, proxy = context_fm(tiny_model, feature_network, chunks, layout, temperature=0.0, progress=False)
    assert cfm.shape == proxy.shape == (2, layout.num_blocks)
    for b in range(2):
        for k in range(layout.num_blocks):
            end = 4 + 4 * k
            context, truth = chunks[b, :end], chunks[b, end:end + 3]
            pool = torch.tensor([[0] * end + [1] * 3])
            feats = [feature_network.sequence_features(torch.cat([context, y])[None], torch.ones(1, end + 3, dtype=torch.long),
                                              pool)[0]
                     for y in (greedy_continuation(tiny_model, context, 3), truth)]
            assert cfm[b, k].item() == pytest.approx(((feats[0] - feats[1]) ** 2).sum().item(), abs=1e-4)


def test_context_fm_is_reproducible_and_seeded(tiny_model):
    feature_network = FeatureNetwork(tiny_model)
    layout = StridedLayout(24, 4, 4, 4, 4)
    chunks = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    first = context_fm(tiny_model, feature_network, chunks, layout, seed=5, batch_size=2, progress=False)
    again = context_fm(tiny_model, feature_network, chunks, layout, seed=5, batch_size=2, progress=False)
    other = context_fm(tiny_model, feature_network, chunks, layout, seed=6, batch_size=2, progress=False)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert context_fm(tiny_model, feature_network, chunks, layout, whitening=None, progress=False)[1] is None
    with pytest.raises(ValueError, match="n >= 2"):
        context_fm(tiny_model, feature_network, chunks, StridedLayout(24, 4, 4, 4, 1), progress=False)


def test_profile_layouts_share_contexts():
    layouts = profile_layouts(32, 8, 8, [8, 1, 4, 2], num_samples=4)
    assert list(layouts) == [1, 2, 4, 8]
    for g, layout in layouts.items():
        assert layout.num_blocks == 3 and layout.gen_len == g and layout.seq_len == 8 + 2 * 8 + g
        assert layout.context_end.tolist() == [8, 16, 24]
    with pytest.raises(ValueError, match="G=32 does not fit"):
        profile_layouts(32, 8, 8, [1, 32], 4)


def test_profile_at_the_longest_length_is_the_full_layout_cfm(tiny_model):
    """For G = G_max the profile's layout is the task's layout, so it gives the same CFM."""
    feature_network = FeatureNetwork(tiny_model)
    chunks = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    profile = fm_profile(tiny_model, feature_network, chunks, profile_layouts(32, 8, 8, [2, 8], 4), seed=7, progress=False)
    cfm, _ = context_fm(tiny_model, feature_network, chunks, StridedLayout(32, 8, 8, 8, 4), seed=7, progress=False)
    assert torch.allclose(profile[8], cfm, atol=1e-6)
    assert set(profile) == {2, 8} and profile[2].shape == (2, 3) and bool(torch.isfinite(profile[2]).all())


def test_skip_gives_a_subset_disjoint_from_the_first_chunks():
    first = set(fixed_subset(50, 10, 43).tolist())
    after = fixed_subset(50, 20, 43, skip=10)
    assert len(after) == 20 and not first & set(after.tolist())
    assert set(fixed_subset(50, None, 43, skip=10).tolist()) == set(range(50)) - first
    with pytest.raises(ValueError, match="cfm_skip"):
        fixed_subset(5, 2, 43, skip=5)
