"""The synthetic process (data=synthetic) and the oracle calibration error against slow obvious computations."""

import itertools

import numpy as np
import pytest
import torch

from ebft.config import DataConfigError
from ebft.data.packing import pack_rows
from ebft.data.sources import load_rows, train_val_split
from ebft.data.synthetic import (HiddenMarkovProcess, make_process, process_from_config, symbol_tokenizer,
                                 synthetic_rows)
from ebft.eval.oracle import exact_frequencies, model_rollouts, ngram_frequencies, oracle_errors
from ebft.models.loading import build_tiny_model

PROCESS = {"vocab": 5, "regimes": 2, "states": 2, "stay": 0.7, "regime_stay": 0.9, "concentration": 0.5, "seed": 3}


def data_cfg(**kw):
    return {"kind": "synthetic", "process": PROCESS, "rows": 20, "row_len": 30, "val_size": 4, "seed": 7, **kw}


def test_rows_are_seeded_and_reproducible():
    a, b = load_rows(data_cfg(), "synthetic"), load_rows(data_cfg(), "synthetic")
    assert a == b and len(a) == 20
    assert all(r["question"] == "" and len(r["answer"].split()) == 30 for r in a)
    assert set(" ".join(r["answer"] for r in a).split()) <= set("abcde")
    assert load_rows(data_cfg(seed=8), "synthetic") != a                 # data seed: other rows
    other = load_rows(data_cfg(process={**PROCESS, "seed": 4}), "synthetic")
    assert other != a                                                    # process seed: another process
    train, val = train_val_split(a, 4, 7)
    assert len(val) == 4 and not {r["answer"] for r in val} & {r["answer"] for r in train}


def test_process_matches_its_definition():
    p = make_process(**PROCESS)
    K = 4
    assert p.transition.shape == (K, K) and p.emission.shape == (K, 5)
    np.testing.assert_allclose(p.transition.sum(1), 1)
    np.testing.assert_allclose(p.emission.sum(1), 1)
    np.testing.assert_allclose(np.diag(p.transition), 0.7 * 0.9)        # stay x regime_stay
    # leaving the regime: 1 - regime_stay, spread evenly over the other regime's states
    np.testing.assert_allclose(p.transition[0, 2:], 0.1 / 2)
    np.testing.assert_allclose(p.initial @ p.transition, p.initial, atol=1e-12)   # stationary start
    # empirical transition and emission frequencies of a long sample match the matrices
    symbols, states = p.sample(400, 200, np.random.default_rng(0))
    pairs = np.zeros((K, K))
    np.add.at(pairs, (states[:, :-1].ravel(), states[:, 1:].ravel()), 1)
    np.testing.assert_allclose(pairs / pairs.sum(1, keepdims=True), p.transition, atol=0.01)
    emitted = np.zeros((K, 5))
    np.add.at(emitted, (states.ravel(), symbols.ravel()), 1)
    np.testing.assert_allclose(emitted / emitted.sum(1, keepdims=True), p.emission, atol=0.01)
    np.testing.assert_allclose(np.bincount(states[:, 0], minlength=K) / 400, p.initial, atol=0.06)


def test_bad_settings_name_the_key():
    with pytest.raises(DataConfigError, match="data.rows"):
        load_rows(data_cfg(rows=None), "synthetic")
    with pytest.raises(DataConfigError, match="unknown data.process key"):
        process_from_config({"states": 2, "sticky": 0.5})
    with pytest.raises(DataConfigError, match="data.process.stay"):
        make_process(stay=1.5)


def test_tokenizer_one_token_per_symbol_and_eos_between_rows():
    tok = symbol_tokenizer(5)
    assert len(tok) == 6 and tok.eos_token_id == 5 and tok.pad_token_id == 5
    rows = synthetic_rows(data_cfg())
    chunks = pack_rows(rows, tok, 31)
    assert len(chunks) == 20                                # 20 rows x (30 symbols + EOS) = 20 chunks of 31
    assert (chunks.input_ids[:, -1] == 5).all() and (chunks.input_ids[:, :-1] < 5).all()
    assert tok.decode(chunks.input_ids[0, :3].tolist()) == " ".join(rows[0]["answer"].split()[:3])


def brute_force(p: HiddenMarkovProcess, context: list[int], G: int):
    """P(s_c | context) and E f, E f f^T of G-token continuations by enumerating every path."""
    K, V = p.transition.shape[0], p.vocab
    post = np.zeros(K)
    for path in itertools.product(range(K), repeat=len(context)):
        w = p.initial[path[0]] * p.emission[path[0], context[0]]
        for t in range(1, len(context)):
            w *= p.transition[path[t - 1], path[t]] * p.emission[path[t], context[t]]
        post[path[-1]] += w
    post /= post.sum()
    uni, pairs = np.zeros(V), np.zeros((V, V))
    for path in itertools.product(range(K), repeat=G):
        w_path = (post @ p.transition)[path[0]]
        for t in range(1, G):
            w_path *= p.transition[path[t - 1], path[t]]
        for ys in itertools.product(range(V), repeat=G):
            w = w_path * np.prod([p.emission[s, y] for s, y in zip(path, ys)])
            f = np.bincount(ys, minlength=V) / G
            uni += w * f
            pairs += w * np.outer(f, f)
    return post, uni, pairs


def test_filter_and_exact_statistics_equal_enumeration():
    p = make_process(vocab=3, regimes=2, states=1, stay=1.0, regime_stay=0.8, concentration=0.7, seed=1)
    context = [0, 2, 2, 1]
    frequencies = p.continuation_frequencies(p.filter(np.array([context])), [1, 2, 3])
    for G in (1, 2, 3):
        post, uni, pairs = brute_force(p, context, G)
        np.testing.assert_allclose(p.filter(np.array([context]))[0], post, rtol=1e-10)
        np.testing.assert_allclose(frequencies[G][0][0], uni, rtol=1e-10)
        np.testing.assert_allclose(frequencies[G][1][0], pairs, rtol=1e-10)


def test_ngram_frequencies_hand_worked():
    tokens = np.array([[0, 1, 1, 7]])                    # vocab 2: token 7 (e.g. EOS) is the extra symbol
    f = ngram_frequencies(tokens, 2, [1, 4])
    np.testing.assert_allclose(f[1]["unigram"], [[1, 0, 0]])
    np.testing.assert_allclose(f[4]["unigram"], [[0.25, 0.5, 0.25]])
    np.testing.assert_allclose(f[4]["pairs"].reshape(3, 3), np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25]))
    with pytest.raises(ValueError, match="horizon G=5"):
        ngram_frequencies(tokens, 2, [5])


def test_oracle_error_is_zero_for_the_process_and_positive_for_another():
    p = make_process(**PROCESS)
    rng = np.random.default_rng(0)
    contexts, _ = p.sample(400, 12, rng)
    horizons = [1, 4, 16]
    own = oracle_errors(p.continue_from(p.filter(contexts), 16, 8, rng), p, contexts, horizons)
    other = make_process(**{**PROCESS, "seed": 9})
    wrong = oracle_errors(other.continue_from(p.filter(contexts), 16, 8, rng), p, contexts, horizons)
    for g in horizons:
        for stat in ("unigram", "pairs"):
            e = own[g][stat].l2
            assert abs(e.mean()) < 3 * e.std() / np.sqrt(len(e))          # unbiased: 0 within noise
            w = wrong[g][stat].l2
            assert w.mean() > 10 * e.std() / np.sqrt(len(e))
            assert (wrong[g][stat].tv.mean() > own[g][stat].tv.mean())
    # the exact expectations sum to 1 (the unigram over V + 1 symbols, the pairs over (V + 1)^2)
    exact = exact_frequencies(p, contexts[:5], [4])
    np.testing.assert_allclose(exact[4]["unigram"].sum(1), 1)
    np.testing.assert_allclose(exact[4]["pairs"].sum(1), 1)


def test_model_rollouts_are_seeded_and_shaped():
    model = build_tiny_model(vocab_size=6, num_layers=1, hidden=16, seed=0).eval()
    contexts = torch.randint(0, 5, (3, 7), generator=torch.Generator().manual_seed(0))
    a = model_rollouts(model, contexts, num=4, length=5, seed=1, batch_size=5)
    assert a.shape == (3, 4, 5) and a.min() >= 0 and a.max() < 6
    np.testing.assert_array_equal(a, model_rollouts(model, contexts, num=4, length=5, seed=1, batch_size=5))
    assert not np.array_equal(a, model_rollouts(model, contexts, num=4, length=5, seed=2))


def test_synthetic_task_evaluates_calibration_only():
    from ebft.config import compose_config, eval_settings, task_settings
    from ebft.eval.runner import plan_metrics

    cfg = compose_config("evaluate", ["task=synthetic", "data=synthetic", "model=synthetic_tiny"])
    assert plan_metrics(task_settings(cfg.task), eval_settings(cfg).benchmarks) == ["ce", "cfm", "profile"]
