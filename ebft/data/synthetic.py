"""A known, seeded generating process as a data source, and the exact statistics of its continuations.

The process is a hidden Markov model with a two-level ("regime" x "state") hidden variable over a
small alphabet of symbols ``a, b, c, ...``:

- ``regimes`` slow regimes, each with ``states`` sticky states; ``K = regimes * states`` in all;
- transitions: with probability ``1 - regime_stay`` jump to a uniformly chosen state of another
  regime (the long-range variable); otherwise stay in the regime, keep the state with probability
  ``stay`` and else move to another state of the regime with the regime's own random
  (Dirichlet) preferences;
- every state emits from its own sparse Dirichlet(``concentration``) distribution over the
  ``vocab`` symbols.

Sequences start from the stationary distribution, so every window of a sequence is a draw of the
same stationary process (a chunk of packed text starts anywhere in a row). Everything is a
deterministic function of ``process.seed`` (the process) and ``data.seed`` (the sampled rows).

A row is one sequence of ``row_len`` symbols written as text (``"a c c b ..."``, the question empty);
:func:`symbol_tokenizer` is the matching word-level tokenizer (one token per symbol, EOS between rows),
so packed chunks hold exactly the process's symbols and the row separators.

The exact statistic (used by the oracle calibration error, :mod:`ebft.eval.oracle`): for a context
``x_1..x_c`` the filtered state distribution ``P(s_c | x_1..x_c)`` (forward algorithm), propagated
through the transition matrix, gives the exact marginal ``P(x_{c+t} = a | x_1..x_c)`` of every
continuation step and the exact pair laws ``P(x_{c+t} = a, x_{c+t'} = b | x_1..x_c)``; their
averages over the positions of a ``G``-token continuation are the expected unigram frequencies and
the expected co-occurrence matrix (:meth:`HiddenMarkovProcess.continuation_frequencies`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ebft.config import DataConfigError

EOS = "<eos>"
PROCESS_KEYS = {"vocab", "regimes", "states", "stay", "regime_stay", "concentration", "seed", "components", "weights"}
DEFAULT_PROCESS = {"vocab": 16, "regimes": 4, "states": 2, "stay": 0.8, "regime_stay": 0.995,
                   "concentration": 0.3, "seed": 0}


@dataclass(frozen=True)
class HiddenMarkovProcess:
    """``initial`` (K,), ``transition`` (K, K) with rows summing to 1, ``emission`` (K, V)."""

    initial: np.ndarray
    transition: np.ndarray
    emission: np.ndarray

    @property
    def vocab(self) -> int:
        return self.emission.shape[1]

    @property
    def symbols(self) -> list[str]:
        return symbol_names(self.vocab)

    def sample(self, num: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``num`` sequences of ``length`` symbols: (symbols, hidden states), both (num, length) int."""
        K = len(self.initial)
        states = np.empty((num, length), dtype=np.int64)
        state = _draw(np.broadcast_to(self.initial, (num, K)), rng)
        for t in range(length):
            states[:, t] = state
            state = _draw(self.transition[state], rng)
        symbols = _draw(self.emission[states.reshape(-1)], rng).reshape(num, length)
        return symbols, states

    def continue_from(self, posterior: np.ndarray, length: int, num: int,
                      rng: np.random.Generator) -> np.ndarray:
        """``num`` continuations of ``length`` symbols from each filtered state distribution
        ``posterior`` (B, K) (the state at the last context symbol): (B, num, length) int."""
        B, K = posterior.shape
        state = _draw(np.repeat(posterior @ self.transition, num, axis=0), rng)
        out = np.empty((B * num, length), dtype=np.int64)
        for t in range(length):
            out[:, t] = _draw(self.emission[state], rng)
            state = _draw(self.transition[state], rng)
        return out.reshape(B, num, length)

    def filter(self, symbols: np.ndarray) -> np.ndarray:
        """Forward algorithm: ``P(s_c | x_1..x_c)`` (B, K) of contexts ``symbols`` (B, c)."""
        belief = np.broadcast_to(self.initial, (symbols.shape[0], len(self.initial))).copy()
        for t in range(symbols.shape[1]):
            if t:
                belief = belief @ self.transition
            belief = belief * self.emission[:, symbols[:, t]].T
            belief /= belief.sum(axis=1, keepdims=True)
        return belief

    def log_likelihood_steps(self, symbols: np.ndarray) -> np.ndarray:
        """``log P(x_t | x_1..x_{t-1})`` (B, L) of sequences ``symbols`` (B, L) under the process (forward
        algorithm; the first step is ``log P(x_1)`` from the initial law). Symbol ids outside the
        alphabet (EOS, any other token) have probability 0: ``-inf`` there and at every later step."""
        symbols = np.asarray(symbols)
        B, L = symbols.shape
        inside = (symbols >= 0) & (symbols < self.vocab)
        ids = np.where(inside, symbols, 0)
        out = np.empty((B, L))
        belief = np.broadcast_to(self.initial, (B, len(self.initial))).copy()
        dead = np.zeros(B, dtype=bool)
        for t in range(L):
            if t:
                belief = belief @ self.transition
            joint = belief * self.emission[:, ids[:, t]].T
            mass = joint.sum(axis=1)
            dead |= ~inside[:, t]
            with np.errstate(divide="ignore"):
                out[:, t] = np.where(dead, -np.inf, np.log(mass))
            belief = joint / np.where(mass > 0, mass, 1.0)[:, None]
        return out

    def continuation_steps(self, contexts: np.ndarray, continuations: np.ndarray) -> np.ndarray:
        """``log p(y_t | c, y_<t)`` (B, m, G) of continuations ``y`` (B, m, G) of contexts ``c`` (B, c): the
        forward algorithm's steps over the continuation; their sum is ``log p(y | c)``."""
        contexts, continuations = np.asarray(contexts), np.asarray(continuations)
        B, m, G = continuations.shape
        rows = np.concatenate([np.repeat(contexts, m, axis=0), continuations.reshape(B * m, G)], axis=1)
        return self.log_likelihood_steps(rows)[:, contexts.shape[1]:].reshape(B, m, G)

    def continuation_frequencies(self, posterior: np.ndarray, horizons) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Exact expected statistics of the first ``G`` continuation symbols, for each ``G``:
        ``{G: (unigram (B, V), pairs (B, V, V))}`` with ``f_a = (1/G) sum_{t<=G} 1[x_{c+t} = a]`` and

            unigram[a]  = E f_a       = (1/G)   sum_{t}     P(x_{c+t} = a)
            pairs[a, b] = E f_a f_b   = (1/G^2) sum_{t, t'} P(x_{c+t} = a, x_{c+t'} = b)

        (the law of the symbols at two independent uniform positions of the continuation, which sees
        co-occurrence at every lag up to ``G - 1``). For ``t < t'`` the pair law is
        ``sum_r J_{t'}[r, a] B[r, b]`` with ``J_{t'}[r, a] = sum_{t < t'} P(x_t = a, s_{t'} = r)``, kept
        by the recursion ``J_{t'+1} = (J_{t'} + p_{t'} * B) A`` (``p_t`` the state law at step ``t``).
        """
        horizons = sorted(set(int(g) for g in horizons))
        B, K = posterior.shape
        V = self.vocab
        state = posterior @ self.transition                      # p_1
        joint = np.zeros((B, K, V))                              # J_1 = 0
        uni_sum, pair_sum = np.zeros((B, V)), np.zeros((B, V, V))
        out = {}
        for t in range(1, horizons[-1] + 1):
            marginal = state @ self.emission
            earlier = np.einsum("bra,rc->bac", joint, self.emission)
            uni_sum += marginal
            pair_sum += earlier + earlier.transpose(0, 2, 1)
            pair_sum[:, np.arange(V), np.arange(V)] += marginal
            if t in horizons:
                out[t] = (uni_sum / t, pair_sum / t ** 2)
            joint = np.einsum("bra,rs->bsa", joint + state[:, :, None] * self.emission[None], self.transition)
            state = state @ self.transition
        return out


def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of ``probs`` (N, M), by inverse CDF."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((u >= cdf).sum(axis=1), probs.shape[1] - 1)


def symbol_names(vocab: int) -> list[str]:
    """``a, b, ..., z, aa, ab, ...``: one word per symbol."""
    letters = string.ascii_lowercase
    names = list(letters) + [x + y for x in letters for y in letters]
    if not 1 <= vocab <= len(names):
        raise DataConfigError(f"data.process.vocab={vocab} must be in [1, {len(names)}]")
    return names[:vocab]


def stationary(transition: np.ndarray) -> np.ndarray:
    """The stationary distribution ``pi = pi A`` (left eigenvector of eigenvalue 1)."""
    values, vectors = np.linalg.eig(transition.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return pi / pi.sum()


def make_process(vocab: int = 16, regimes: int = 4, states: int = 2, stay: float = 0.8,
                 regime_stay: float = 0.995, concentration: float = 0.3, seed: int = 0) -> HiddenMarkovProcess:
    """The process of the module docstring, drawn with ``seed``."""
    for key, value, ok in (("stay", stay, 0 <= stay <= 1), ("regime_stay", regime_stay, 0 <= regime_stay <= 1),
                           ("concentration", concentration, concentration > 0),
                           ("regimes", regimes, regimes >= 1), ("states", states, states >= 1)):
        if not ok:
            raise DataConfigError(f"data.process.{key}={value} is out of range (probabilities in [0, 1], "
                                  "concentration > 0, regimes and states >= 1)")
    symbol_names(vocab)
    rng = np.random.default_rng(seed)
    K = regimes * states
    regime_of = np.repeat(np.arange(regimes), states)
    transition = np.zeros((K, K))
    for r in range(regimes):
        block = np.flatnonzero(regime_of == r)
        for i in block:
            if states > 1:
                move = rng.dirichlet(np.ones(states - 1))
                others = block[block != i]
                transition[i, others] = (1 - stay) * move
                transition[i, i] = stay
            else:
                transition[i, i] = 1.0
        if regimes > 1:
            outside = np.flatnonzero(regime_of != r)
            transition[block] *= regime_stay
            transition[np.ix_(block, outside)] += (1 - regime_stay) / len(outside)
    emission = rng.dirichlet(np.full(vocab, concentration), size=K)
    return HiddenMarkovProcess(stationary(transition), transition, emission)


def mixture(processes: list[HiddenMarkovProcess], weights) -> HiddenMarkovProcess:
    """The process that draws one component ``i`` with probability ``weights[i]`` and then runs it: one
    hidden Markov model with the components' states side by side (a block-diagonal transition
    matrix, no switching between components) and initial law ``weights[i] * initial_i``. All
    components share the alphabet."""
    weights = np.asarray(weights, dtype=float)
    if len(processes) != len(weights) or len(processes) < 1 or (weights < 0).any() or weights.sum() <= 0:
        raise DataConfigError(f"a mixture needs one weight >= 0 per component (and some > 0), got {weights.tolist()} "
                              f"for {len(processes)} components")
    vocab = {p.vocab for p in processes}
    if len(vocab) != 1:
        raise DataConfigError(f"the components of a mixture must share one alphabet, got vocab sizes {sorted(vocab)}")
    weights = weights / weights.sum()
    sizes = [len(p.initial) for p in processes]
    transition = np.zeros((sum(sizes), sum(sizes)))
    at = 0
    for p, k in zip(processes, sizes):
        transition[at:at + k, at:at + k] = p.transition
        at += k
    initial = np.concatenate([w * p.initial for w, p in zip(weights, processes)])
    return HiddenMarkovProcess(initial, transition, np.concatenate([p.emission for p in processes]))


def process_from_config(cfg: Mapping | None) -> HiddenMarkovProcess:
    """:func:`make_process` from ``data.process`` (missing keys take :data:`DEFAULT_PROCESS`), or with
    ``components`` (a list of such specs, each on top of the other keys) and ``weights`` their
    :func:`mixture`."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - PROCESS_KEYS)
    if unknown:
        raise DataConfigError(f"unknown data.process key(s) {unknown}; known keys: {sorted(PROCESS_KEYS)}")
    components, weights = cfg.pop("components", None), cfg.pop("weights", None)
    if components is None:
        if weights is not None:
            raise DataConfigError("data.process.weights needs data.process.components (one weight per component)")
        return make_process(**{**DEFAULT_PROCESS, **cfg})
    parts = [process_from_config({**cfg, **dict(c)}) for c in components]
    return mixture(parts, [1.0] * len(parts) if weights is None else list(weights))


def synthetic_rows(cfg: Mapping) -> list[dict]:
    """``data.rows`` rows of ``data.row_len`` symbols from ``data.process``, drawn with ``data.seed``."""
    rows, length = cfg.get("rows"), cfg.get("row_len")
    if not isinstance(rows, int) or rows < 1 or not isinstance(length, int) or length < 2:
        raise DataConfigError(f"data.kind=synthetic needs data.rows >= 1 and data.row_len >= 2 (whole numbers), "
                              f"got rows={rows}, row_len={length}")
    process = process_from_config(cfg.get("process"))
    symbols, _ = process.sample(rows, length, np.random.default_rng(int(cfg.get("seed", 43))))
    names = np.array(process.symbols)
    return [{"question": "", "answer": " ".join(names[row])} for row in symbols]


def symbol_tokenizer(vocab: int):
    """Word-level tokenizer of the process's symbols: ids ``0..vocab-1`` are the symbols, ``vocab``
    is EOS (also the pad token); text is split on whitespace and decoded with single spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {name: i for i, name in enumerate(symbol_names(vocab))}
    words[EOS] = vocab
    core = Tokenizer(models.WordLevel(words, unk_token=EOS))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def save_symbol_tokenizer(vocab: int, directory: str | Path):
    """Write :func:`symbol_tokenizer` with ``save_pretrained``; returns the tokenizer."""
    tok = symbol_tokenizer(vocab)
    tok.save_pretrained(str(directory))
    return tok
