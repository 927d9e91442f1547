"""Paired statistics: equal to the obvious computations, exact sign-flip p-values on small cases."""

import itertools
import math

import pytest
import torch

from ebft.eval.paired import paired_by_chunk, paired_difference, sign_flip_p_value


def exact_sign_flip_p(d):
    """All 2^n sign patterns: the exact two-sided p-value of the sign-flip test."""
    observed = abs(sum(d) / len(d))
    count = sum(abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= observed - 1e-12
                for signs in itertools.product((-1, 1), repeat=len(d)))
    return count / 2 ** len(d)


def test_mean_se_interval_match_the_formulas():
    a = [0.50, 0.42, 0.61, 0.38, 0.47, 0.55]
    b = [0.45, 0.40, 0.52, 0.40, 0.41, 0.50]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    r = paired_difference(a, b, n_permutations=2000)
    assert r.n == 6
    assert r.mean == pytest.approx(mean, abs=1e-12)
    assert r.se == pytest.approx(sd / math.sqrt(6), abs=1e-12)
    assert r.ci_low == pytest.approx(mean - 1.959964 * r.se, abs=1e-6)
    assert r.ci_high == pytest.approx(mean + 1.959964 * r.se, abs=1e-6)


@pytest.mark.parametrize("d", [[0.3, -0.1, 0.2, 0.25, 0.05, -0.02, 0.4, 0.1, 0.12, -0.3],
                               [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                               [0.2, -0.2, 0.1, -0.1, 0.05, -0.05]])
def test_sign_flip_p_value_matches_exact_enumeration(d):
    exact = exact_sign_flip_p(d)
    approx = sign_flip_p_value(torch.tensor(d), n_permutations=40_000, seed=1)
    assert approx == pytest.approx(exact, abs=0.01)


def test_identical_models_have_zero_difference_and_p_one():
    a = torch.rand(50, generator=torch.Generator().manual_seed(0))
    r = paired_difference(a, a.clone(), n_permutations=500)
    assert r.mean == 0 and r.se == 0 and r.p_value == 1.0 and not r.excludes_zero()


def test_pairing_is_tighter_than_independent_means():
    g = torch.Generator().manual_seed(0)
    difficulty = torch.rand(400, generator=g)             # shared per-context difficulty
    a = difficulty + 0.01 * torch.randn(400, generator=g) - 0.01
    b = difficulty + 0.01 * torch.randn(400, generator=g)
    r = paired_difference(a, b)
    unpaired_se = math.sqrt(a.var().item() / 400 + b.var().item() / 400)
    assert r.se < unpaired_se / 5
    assert r.excludes_zero() and r.ci_high < 0 and r.p_value < 0.001


def test_by_chunk_averages_blocks_first():
    a = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])
    b = torch.zeros(3, 2)
    r = paired_by_chunk(a, b, n_permutations=100)
    assert r.n == 3 and r.mean == pytest.approx(2.0) and r.se == pytest.approx(0.0)


def test_mismatched_units_are_refused():
    with pytest.raises(ValueError, match="same units"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([1.0, float("nan")], [1.0, 2.0])
