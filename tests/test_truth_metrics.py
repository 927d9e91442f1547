"""Exact truth metrics of a known process (``ebft.eval.oracle.exact_kl``): the forward filter's
likelihood against brute-force enumeration of hidden paths, the process scoring 0 against itself, the
Monte-Carlo KL estimates against exact KLs by enumeration, and mixtures of processes."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ebft.data.synthetic import make_process, mixture
from ebft.eval.oracle import exact_kl


def brute_force_probability(process, sequence) -> float:
    """P(x_1..x_L) by summing over every hidden path (K^L of them)."""
    K, total = len(process.initial), 0.0
    for path in itertools.product(range(K), repeat=len(sequence)):
        p = process.initial[path[0]] * process.emission[path[0], sequence[0]]
        for t in range(1, len(sequence)):
            p *= process.transition[path[t - 1], path[t]] * process.emission[path[t], sequence[t]]
        total += p
    return total


class ProcessModel(torch.nn.Module):
    """A "language model" whose next-token law is exactly a process's (logits = log P(x_{t+1} | x_<=t))."""

    def __init__(self, process):
        super().__init__()
        self.process = process

    def forward(self, input_ids):
        ids = input_ids.numpy()
        logits = np.empty(ids.shape + (self.process.vocab,))
        for t in range(ids.shape[1]):
            belief = self.process.filter(ids[:, : t + 1]) @ self.process.transition
            logits[:, t] = np.log(belief @ self.process.emission)
        return SimpleNamespace(logits=torch.from_numpy(logits))


def exact_kls(model_process, process, context, G: int) -> tuple[float, float]:
    """KL(model || process) and KL(process || model) of G-token continuations of ``context``, by enumeration."""
    ys = np.array(list(itertools.product(range(process.vocab), repeat=G)))[None]
    log_true = process.continuation_steps(context[None], ys).sum(-1)[0]
    log_model = model_process.continuation_steps(context[None], ys).sum(-1)[0]
    reverse = float((np.exp(log_model) * (log_model - log_true)).sum())
    forward = float((np.exp(log_true) * (log_true - log_model)).sum())
    return reverse, forward


PROCESS = make_process(vocab=3, regimes=1, states=2, stay=0.7, concentration=0.8, seed=1)
OTHER = make_process(vocab=3, regimes=1, states=2, stay=0.4, concentration=0.8, seed=7)


def test_the_forward_filter_is_the_brute_force_likelihood():
    contexts = np.array([[0, 2], [1, 1]])
    ys = np.array(list(itertools.product(range(3), repeat=3)))              # all 27 continuations of 3 symbols
    steps = PROCESS.continuation_steps(contexts, np.stack([ys, ys]))        # (2, 27, 3)
    for b, context in enumerate(contexts):
        prior = brute_force_probability(PROCESS, context)
        expected = [brute_force_probability(PROCESS, [*context, *y]) / prior for y in ys]
        np.testing.assert_allclose(np.exp(steps[b].sum(-1)), expected, rtol=1e-10)
        assert np.exp(steps[b].sum(-1)).sum() == pytest.approx(1.0)
    # a token outside the alphabet (EOS) has probability 0
    assert np.isneginf(PROCESS.log_likelihood_steps(np.array([[0, 3, 1]]))[0, 1:]).all()


def test_the_process_scores_zero_against_itself():
    contexts = PROCESS.sample(6, 4, np.random.default_rng(0))[0]
    kl = exact_kl(ProcessModel(PROCESS), PROCESS, contexts, horizons=[1, 3], num=5)
    for g in (1, 3):
        np.testing.assert_allclose(kl[g]["reverse"], 0.0, atol=1e-6)     # float32 log-softmax of the "model"
        np.testing.assert_allclose(kl[g]["forward"], 0.0, atol=1e-6)


def test_the_estimates_match_the_exact_kls():
    context = np.array([2, 0, 0])
    num = 3000
    kl = exact_kl(ProcessModel(OTHER), PROCESS, context[None], horizons=[3], num=num)
    reverse, forward = exact_kls(OTHER, PROCESS, context, 3)
    assert reverse > 0.05 and forward > 0.05                      # the two processes differ
    # within 4 standard errors of the exact values (per-rollout spread bounded by the log ratios' range)
    for name, exact in (("reverse", reverse), ("forward", forward)):
        assert kl[3][name][0] == pytest.approx(exact, abs=4 * 1.5 / np.sqrt(num)), name


def test_a_mixture_runs_one_component_drawn_by_weight():
    a, b = make_process(vocab=4, seed=1), make_process(vocab=4, seed=2)
    only_a = mixture([a, b], [1.0, 0.0])
    seqs = a.sample(5, 12, np.random.default_rng(3))[0]
    np.testing.assert_allclose(only_a.log_likelihood_steps(seqs), a.log_likelihood_steps(seqs), rtol=1e-10)
    half = mixture([a, b], [1.0, 1.0])
    probability = np.exp(half.log_likelihood_steps(seqs).sum(-1))
    expected = 0.5 * np.exp(a.log_likelihood_steps(seqs).sum(-1)) + 0.5 * np.exp(b.log_likelihood_steps(seqs).sum(-1))
    np.testing.assert_allclose(probability, expected, rtol=1e-8)
    states = half.sample(50, 30, np.random.default_rng(4))[1]
    assert ((states < len(a.initial)).all(1) | (states >= len(a.initial)).all(1)).all()   # no switching


def test_a_mixture_from_the_data_config():
    from ebft.config import DataConfigError
    from ebft.data.synthetic import process_from_config

    spec = {"vocab": 4, "components": [{"seed": 1}, {"seed": 2}], "weights": [3, 1]}
    expected = mixture([make_process(vocab=4, seed=1), make_process(vocab=4, seed=2)], [0.75, 0.25])
    got = process_from_config(spec)
    np.testing.assert_allclose(got.initial, expected.initial)
    np.testing.assert_allclose(got.transition, expected.transition)
    with pytest.raises(DataConfigError, match="one weight >= 0 per component"):
        process_from_config({**spec, "weights": [1]})
    with pytest.raises(DataConfigError, match="weights needs data.process.components"):
        process_from_config({"weights": [1, 1]})
