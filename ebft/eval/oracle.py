"""Oracle calibration error: how far a model's rollouts are from a known process's continuations.

For a held-out context ``c`` drawn from a process whose continuation law is known exactly
(:class:`ebft.data.synthetic.HiddenMarkovProcess`), let ``f(y)`` be the n-gram frequency vector of a
``G``-token continuation ``y``: ``unigram``, its symbol frequencies ``f`` (``V + 1`` entries, the last
counting any token that is not one of the process's ``V`` symbols, e.g. EOS), or ``pairs``, their
outer product ``f f^T`` (``(V + 1)^2`` entries; its expectation is the law of the symbols at two
random positions of the continuation, so it sees how persistent the continuation is at every lag).
With ``m`` model rollouts ``y_1..y_m`` from ``c`` and the exact expectation ``F = E_true[f(y) | c]``:

- ``l2``: the unbiased estimate of ``|| E_model f(y) - F ||^2``, the feature-matching loss
  ``L_FM`` of paper eq. 2 for the feature map ``f`` at one context: with the data moment ``F`` known,
  ``L_FM`` itself is measured, not ``L_CFM = L_FM + Var[f(y) | c]`` (paper eqs. 2 and 5). It is the
  CFM estimator (:func:`ebft.objectives.rewards.cfm_estimate`, with ``f`` as the features and the exact ``F`` in the
  place of one ground-truth continuation, so the truth's own sampling noise is gone: the true process
  scores 0 in expectation, and any model scores >= 0 in expectation);
- ``tv``: the plug-in total variation ``(1/2) || mean_j f(y_j) - F ||_1`` (biased upwards by the
  finite ``m``; :func:`oracle_errors` of the process's own samples gives that floor).

CFM compares the model with one sampled continuation through a learned feature network; the oracle
compares it with the exact continuation law through features whose meaning is known.

The exact truth metrics compare whole continuations, through the process's own likelihood
(:meth:`~ebft.data.synthetic.HiddenMarkovProcess.continuation_steps`, the forward filter):

- ``reverse`` KL of ``G``-token rollouts, ``E_{y ~ p_theta(.|c)}[log p_theta(y|c) - log p(y|c)]``: the
  mean over rollouts of the model of their log-likelihood ratio; what a model puts where the
  process does not (mode-seeking). Its estimate from the process's own samples is exactly 0;
- ``forward`` KL, ``E_{y ~ p(.|c)}[log p(y|c) - log p_theta(y|c)]``: the model's cross-entropy on the
  process's continuations minus the process's conditional entropy, on the same continuations.

Both per context (paired comparisons over the same contexts and random numbers), for every horizon
``G`` (the first ``G`` tokens of 32-token continuations). The model's law here is its distribution
over the process's ``V`` symbols (logits of other tokens, e.g. EOS between packed rows, left out and
the rest renormalised), so that every rollout is a sequence the process can score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ebft.core.compat import get_lm_head
from ebft.objectives.rewards import cfm_estimate
from ebft.core.layout import StridedLayout
from ebft.rollout.sampler import sample_strided

STATISTICS = ("unigram", "pairs")
KL = ("reverse", "forward")


def ngram_frequencies(tokens: np.ndarray, vocab: int, horizons) -> dict[int, dict[str, np.ndarray]]:
    """The statistics of the first ``G`` tokens of continuations ``tokens`` (..., G_max), for each ``G``
    in ``horizons``: ``{G: {"unigram": f (..., V+1), "pairs": f f^T flattened (..., (V+1)^2)}}``.
    Token ids ``>= vocab`` count as the extra symbol ``V``."""
    tokens = np.minimum(np.asarray(tokens), vocab)
    W = vocab + 1
    counts = np.cumsum(np.eye(W)[tokens], axis=-2)                 # (..., G_max, W)
    out = {}
    for g in sorted(set(int(h) for h in horizons)):
        if not 1 <= g <= tokens.shape[-1]:
            raise ValueError(f"horizon G={g} is outside 1..{tokens.shape[-1]} (the rollout length)")
        f = counts[..., g - 1, :] / g
        out[g] = {"unigram": f, "pairs": (f[..., :, None] * f[..., None, :]).reshape(f.shape[:-1] + (W * W,))}
    return out


def exact_frequencies(process, contexts: np.ndarray, horizons) -> dict[int, dict[str, np.ndarray]]:
    """The process's exact expectations ``F`` in the layout of :func:`ngram_frequencies`."""
    V = process.vocab
    exact = process.continuation_frequencies(process.filter(contexts), horizons)
    out = {}
    for g, (uni, pairs) in exact.items():
        B = uni.shape[0]
        padded = np.zeros((B, V + 1, V + 1))
        padded[:, :V, :V] = pairs
        out[g] = {"unigram": np.concatenate([uni, np.zeros((B, 1))], axis=1), "pairs": padded.reshape(B, -1)}
    return out


@dataclass(frozen=True)
class OracleError:
    """Per-context errors at one horizon and statistic: ``l2`` and ``tv``, each (contexts,)."""

    l2: np.ndarray
    tv: np.ndarray


def oracle_errors(samples: np.ndarray, process, contexts: np.ndarray, horizons) -> dict[int, dict[str, OracleError]]:
    """Errors of rollouts ``samples`` (B, m, G_max) (token ids, m >= 2) from ``contexts`` (B, c) (symbol ids),
    ``{G: {"unigram": OracleError, "bigram": OracleError}}`` (module docstring)."""
    if samples.ndim != 3 or samples.shape[1] < 2:
        raise ValueError(f"samples has shape {samples.shape}; expected (contexts, m >= 2 rollouts, G_max)")
    model = ngram_frequencies(samples, process.vocab, horizons)
    truth = exact_frequencies(process, contexts, horizons)
    out = {}
    for g in model:
        out[g] = {}
        for stat in STATISTICS:
            f, F = model[g][stat], truth[g][stat]
            l2 = cfm_estimate(torch.from_numpy(f), torch.from_numpy(F)).numpy()
            tv = 0.5 * np.abs(f.mean(axis=1) - F).sum(axis=1)
            out[g][stat] = OracleError(l2, tv)
    return out


@torch.no_grad()
def model_rollouts(model, contexts: torch.Tensor, num: int, length: int, temperature: float = 1.0,
                   seed: int = 43, batch_size: int = 512) -> np.ndarray:
    """``num`` rollouts of ``length`` tokens from every context row of ``contexts`` (B, c) token ids,
    with the project's KV-cached sampler (each context repeated ``num`` times, one block and one
    sample per row) and one seeded generator: (B, num, length)."""
    device = get_lm_head(model).weight.device
    c = contexts.shape[1]
    layout = StridedLayout(c + length, c, 1, length, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = contexts.repeat_interleave(num, dim=0)
    out = []
    for start in range(0, len(rows), batch_size):
        ctx = rows[start:start + batch_size].to(device)
        ids = torch.cat([ctx, ctx.new_zeros(len(ctx), length)], dim=1)  # placeholders, never attended to
        out.append(sample_strided(model, ids, layout, temperature=temperature, generator=generator)[:, 0, 0].cpu())
    return torch.cat(out).reshape(len(contexts), num, length).numpy()


def _symbol_logprobs(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-probabilities (B, L, V) of the next symbol at every position of ``ids`` (B, L): the model's
    logits over the process's ``vocab`` symbols, renormalised (temperature 1)."""
    return model(input_ids=ids).logits[..., :vocab].float().log_softmax(-1)


@torch.no_grad()
def symbol_rollouts(model, contexts: torch.Tensor, num: int, length: int, vocab: int,
                    seed: int = 43) -> tuple[np.ndarray, np.ndarray]:
    """``num`` rollouts of ``length`` symbols from every context (B, c) under the model's symbol law, and
    their per-step log-probabilities: ``(tokens (B, num, length), logp (B, num, length))``. One torch
    generator seeded with ``seed``: the same contexts and seed draw the same random numbers for every
    model (paired comparisons)."""
    device = get_lm_head(model).weight.device if hasattr(model, "get_output_embeddings") else contexts.device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = contexts.to(device).repeat_interleave(num, dim=0)
    tokens, logps = [], []
    for _ in range(length):
        logp = _symbol_logprobs(model, ids, vocab)[:, -1]
        u = torch.rand(len(ids), 1, generator=generator, device=device)
        nxt = torch.searchsorted(logp.exp().cumsum(-1), u * logp.exp().sum(-1, keepdim=True)).clamp_(max=vocab - 1)
        tokens.append(nxt[:, 0])
        logps.append(logp.gather(-1, nxt)[:, 0])
        ids = torch.cat([ids, nxt], dim=1)
    shape = (len(contexts), num, length)
    return torch.stack(tokens, 1).reshape(shape).cpu().numpy(), torch.stack(logps, 1).reshape(shape).cpu().numpy()


@torch.no_grad()
def symbol_logprobs(model, contexts: torch.Tensor, continuations: np.ndarray, vocab: int,
                    batch_size: int = 512) -> np.ndarray:
    """Per-step ``log p_theta(y_t | c, y_<t)`` (B, m, G) of continuations (B, m, G) under the model's symbol
    law (one causal forward of ``[c, y]`` per row)."""
    B, m, G = continuations.shape
    c = contexts.shape[1]
    device = get_lm_head(model).weight.device if hasattr(model, "get_output_embeddings") else contexts.device
    rows = torch.cat([contexts.repeat_interleave(m, dim=0), torch.from_numpy(continuations.reshape(B * m, G))], 1)
    out = []
    for start in range(0, len(rows), batch_size):
        ids = rows[start:start + batch_size].to(device)
        logp = _symbol_logprobs(model, ids[:, :-1], vocab)[:, c - 1:]             # predicts positions c..c+G-1
        out.append(logp.gather(-1, ids[:, c:, None])[..., 0].cpu())
    return torch.cat(out).reshape(B, m, G).numpy()


def exact_kl(model, process, contexts: np.ndarray, horizons, num: int = 8, seed: int = 43,
             rng_seed: int = 2043) -> dict[int, dict[str, np.ndarray]]:
    """The exact truth metrics of the module docstring, per context: ``{G: {"reverse": (B,), "forward": (B,)}}``.

    ``contexts`` (B, c) symbol ids; ``num`` rollouts of the model per context (drawn with ``seed``) and
    ``num`` continuations of the process (drawn with ``rng_seed``), each ``max(horizons)`` long."""
    horizons = sorted(set(int(g) for g in horizons))
    length = horizons[-1]
    ctx = torch.from_numpy(np.asarray(contexts))
    tokens, model_steps = symbol_rollouts(model, ctx, num, length, process.vocab, seed)
    truth_steps = process.continuation_steps(contexts, tokens)
    truth_samples = process.continue_from(process.filter(np.asarray(contexts)), length, num,
                                          np.random.default_rng(rng_seed))
    truth_of_truth = process.continuation_steps(contexts, truth_samples)
    model_of_truth = symbol_logprobs(model, ctx, truth_samples, process.vocab)
    out = {}
    for g in horizons:
        reverse = (model_steps[..., :g] - truth_steps[..., :g]).sum(-1).mean(-1)
        forward = (truth_of_truth[..., :g] - model_of_truth[..., :g]).sum(-1).mean(-1)
        out[g] = {"reverse": reverse, "forward": forward}
    return out

