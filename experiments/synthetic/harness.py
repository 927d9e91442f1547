"""The fast harness of the known-answer bench: SFT and EBFT updates on a tiny model in a plain loop, the
library's own pieces and nothing else.

An SFT step is :func:`ebft.objectives.losses.cross_entropy_term` + AdamW; an EBFT step is exactly what
``EBFTModule.training_step`` calls (:func:`ebft.rollout.sampler.sample_strided`,
``FeatureNetwork.strided_features``, :func:`ebft.objectives.ebft_update.ebft_update`; the equality of
that sequence with the module's step is tested in ``tests/test_step_cost.py``) + AdamW. What the
application adds around it (Lightning's loop, logging, validation callbacks, a process per run) is
left out, so many runs fit in one process: ``bench/synthetic_step.py`` measures the difference.

Training stops early on validation CE (evaluated every ``eval_every`` steps; the best state is kept,
and the run stops after ``patience`` evaluations without improvement); a run's result is its best
state and its curve.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ebft.config import EBFTSettings
from ebft.core.layout import StridedLayout
from ebft.models.features import FeatureNetwork
from ebft.objectives.ebft_update import ebft_update
from ebft.objectives.losses import cross_entropy_term
from ebft.objectives.rewards import cfm_estimate
from ebft.rollout.sampler import sample_strided


@dataclass(frozen=True)
class Budget:
    """How long a run may train and how it stops: AdamW at ``lr`` on batches of ``batch`` chunks, at most
    ``max_steps`` steps, validation CE every ``eval_every`` steps, stop after ``patience`` evaluations
    without a new best and keep the best state; ``early_stop=False`` runs every step and keeps the last."""

    lr: float
    max_steps: int
    batch: int = 16
    eval_every: int = 20
    patience: int = 5
    early_stop: bool = True


@dataclass
class RunResult:
    """The best state (by validation CE), its step, the validation curve and the cost of the run."""

    state: dict
    best_step: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def chunk_ce(model, chunks: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Mean next-token CE of every chunk (N,), teacher-forced, no grad (the model is left in eval mode)."""
    head = model.get_output_embeddings()
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(chunks), batch):
            x = chunks[start:start + batch]
            hidden = model.model(input_ids=x).last_hidden_state
            logp = (hidden[:, :-1] @ head.weight.T).float().log_softmax(-1)
            out.append(-logp.gather(-1, x[:, 1:, None])[..., 0].mean(-1))
    return torch.cat(out).numpy()


def sft_step(model, opt, x: torch.Tensor) -> None:
    loss = cross_entropy_term(model.model(input_ids=x).last_hidden_state, model.get_output_embeddings().weight, x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def ebft_step(model, opt, x: torch.Tensor, feature_network: FeatureNetwork, layout: StridedLayout,
              method: EBFTSettings, generator: torch.Generator) -> None:
    s = method.sampling
    tokens = sample_strided(model, x, layout, temperature=s.temperature, top_p=s.top_p, generator=generator)
    row = layout.scatter_generated(x, tokens)
    gen, gt = feature_network.strided_features(row, layout)
    loss, _ = ebft_update(model, layout, row, tokens, gen, gt, method)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train(model, train_chunks: torch.Tensor, val_chunks: torch.Tensor, budget: Budget, seed: int,
          ebft: tuple[FeatureNetwork, StridedLayout, EBFTSettings] | None = None) -> RunResult:
    """Train ``model`` in place by SFT (``ebft`` None) or EBFT (its feature network, layout, settings) on
    epochs of ``train_chunks`` (a new seeded order each epoch), stopping early on ``val_chunks``' CE;
    return the best state. The model ends in that state."""
    start, cpu = time.time(), time.process_time()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=budget.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    best = (float(chunk_ce(model, val_chunks).mean()), 0, copy.deepcopy(model.state_dict()))
    curve, waited, order = [(0, best[0])], 0, []
    model.train()
    for step in range(1, budget.max_steps + 1):
        if len(order) < budget.batch:
            order += list(rng.permutation(len(train_chunks)))
        x = train_chunks[order[:budget.batch]]
        order = order[budget.batch:]
        if ebft is None:
            sft_step(model, opt, x)
        else:
            ebft_step(model, opt, x, *ebft, generator)
        if step % budget.eval_every == 0:
            ce = float(chunk_ce(model, val_chunks).mean())
            model.train()
            curve.append((step, ce))
            if ce < best[0]:
                best, waited = (ce, step, copy.deepcopy(model.state_dict())), 0
            elif budget.early_stop:
                waited += 1
                if waited >= budget.patience:
                    break
    if not budget.early_stop:
        best = (curve[-1][1], step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return RunResult(best[2], best[1], curve, time.time() - start, time.process_time() - cpu)


def context_cfm(model, feature_network: FeatureNetwork, contexts: torch.Tensor, continuations: torch.Tensor,
                num: int, seed: int) -> np.ndarray:
    """The unbiased CFM estimate (paper eq. 5) per context (B,): ``num`` rollouts of ``G`` tokens of the
    model from each context against the one true continuation (B, G), scored by ``feature_network``
    (one block per row: the strided layout with C = the context length)."""
    c, g = contexts.shape[1], continuations.shape[1]
    layout = StridedLayout(c + g, c, 1, g, num)
    x = torch.cat([contexts, continuations], 1)
    with torch.no_grad():
        tokens = sample_strided(model, x, layout, temperature=1.0, generator=torch.Generator().manual_seed(seed))
        gen, gt = feature_network.strided_features(layout.scatter_generated(x, tokens), layout)
    return cfm_estimate(gen, gt)[:, 0].numpy()
