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
