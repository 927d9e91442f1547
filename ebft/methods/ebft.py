"""Energy-based fine-tuning (paper §2, Algorithm 1).

One training step on a micro-batch of chunks ``x`` (batch, T):

1. sample ``n`` completions of ``G`` tokens for every context ``x[0:C+k*s]`` with the
   KV-cached strided sampler (no grad, eval mode);
2. one no-grad pass of the frozen feature network over the strided row gives
   ``phi(c_k : y_hat_jk)`` and ``phi(c_k : y_k)`` for all blocks (paper eq. 4);
3. rewards ``r_j = AT_j - alpha * DT_j`` (eqs. 7, 9, 67; whitening per config) and the
   corrected RLOO baseline (eq. 94; ``method.baseline`` picks another) give advantages ``A_jk = r_jk - b_jk``;
4. ONE forward+backward of the generator over the strided row yields the log-probs of all
   generated tokens (scored at ``layout.score_index``, logits / temperature) and the
   teacher-forced CE of the chunk, and the loss is
   ``rl_coef * PG(-A log p) + gamma * CE`` (token mean, as the authors' code: docs/authors_code.md).
"""

from __future__ import annotations

import logging
import time

import torch

from ebft.config import TrainSettings
from ebft.methods.base import FineTuneModule, generator_source
from ebft.models.compat import attn_implementation, backbone_forward, check_strided, lm_head, param_dtype
from ebft.models.features import build_feature_network
from ebft.models.loading import resolve_dtype
from ebft.objectives.baselines import fm_advantages
from ebft.objectives.losses import cross_entropy_term, policy_gradient_loss, token_logprobs
from ebft.objectives.rewards import cfm_estimate, feature_matching_rewards
from ebft.rollout.layout import StridedLayout
from ebft.rollout.masks import strided_mask
from ebft.rollout.sampler import sample_strided

log = logging.getLogger(__name__)


def strided_hidden(model, row: torch.Tensor, layout: StridedLayout) -> torch.Tensor:
    """Final hidden states (batch, length, H) of ``model`` over strided rows (batch, length), one pass."""
    check_strided(model, layout.seq_len)
    layout = layout.to(row.device)
    mask = strided_mask(layout, attn_implementation(model), param_dtype(model))
    hidden, _ = backbone_forward(model, row, layout.position_ids, mask)
    return hidden


def actor_loss(model, layout: StridedLayout, row: torch.Tensor, advantages: torch.Tensor, temperature: float,
               gamma: float, rl_coef: float = 1.0, reduction: str = "token_mean",
               ce_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, pg, ce)`` of the actor update from ONE forward of ``model`` over the strided rows.

    ``row`` (batch, length) from ``layout.scatter_generated``; ``advantages`` (batch, n, NB). The LM
    head runs only on the ``n*NB*G`` scoring rows (``layout.score_index``, logits / temperature) and
    the ``T - 1`` teacher-forced rows of the chunk: full-length logits are never formed. The head
    is the model's own (bias and final soft-cap included, ``ebft.models.compat.lm_head``).
    """
    layout = layout.to(row.device)
    hidden = strided_hidden(model, row, layout)
    head = lm_head(model)
    targets = row[:, layout.token_index]                                 # (B, n, NB, G)
    logprobs = token_logprobs(hidden[:, layout.score_index], head.weight, targets, temperature=temperature,
                              lm_head_bias=head.bias, softcap=head.softcap)
    pg = policy_gradient_loss(logprobs, layout.broadcast_to_tokens(advantages), reduction=reduction)
    ce = cross_entropy_term(hidden[:, : layout.seq_len], head.weight, row[:, : layout.seq_len], ce_mask,
                            lm_head_bias=head.bias, softcap=head.softcap)
    return rl_coef * pg + gamma * ce, pg, ce


def duplicate_fraction(tokens: torch.Tensor) -> torch.Tensor:
    """Fraction of rollouts (b, j, k) whose G tokens equal another sample's of the same context."""
    n = tokens.shape[1]
    same = (tokens.unsqueeze(2) == tokens.unsqueeze(1)).all(-1)  # (B, n, n, NB)
    same &= ~torch.eye(n, dtype=torch.bool, device=tokens.device)[None, :, :, None]
    return same.any(2).float().mean()


class EBFTModule(FineTuneModule):
    strided_rows = True

    def __init__(self, settings: TrainSettings, tokenizer):
        super().__init__(settings, tokenizer)
        self.method = m = settings.method
        self.layout = StridedLayout(*settings.task.geometry, m.sampling.num_samples)
        model, device = settings.model, settings.device
        base_weights = generator_source(model) == model.name   # phi is the BASE model (paper §2), also for warm starts
        self.features = build_feature_network(settings.feature_network, model.name, resolve_dtype(model.dtype, device),
                                              device, model.attn_implementation,
                                              generator=self.generator if base_weights else None,
                                              adapters=self.adapters if base_weights else None)

    def rollout(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Sampled tokens (batch, n, NB, G) from the current policy."""
        s = self.method.sampling
        return sample_strided(self.generator, ids, self.layout, temperature=s.temperature, top_p=s.top_p,
                              generator=self.sampling_generator(batch_idx))

    def training_step(self, batch, batch_idx):
        m = self.method
        ids = batch["input_ids"]
        layout = self.layout.to(ids.device)
        t0 = time.perf_counter()
        tokens = self.rollout(ids, batch_idx)
        row = layout.scatter_generated(ids, tokens)
        t1 = time.perf_counter()
        gen_f, gt_f = self.features.strided_features(row, layout)           # (B, NB, n, D), (B, NB, D)
        rewards = feature_matching_rewards(gen_f, gt_f, m.alpha, m.whitening)
        advantages = fm_advantages(rewards, m.alpha, m.baseline).transpose(-1, -2)  # (B, n, NB)
        t2 = time.perf_counter()

        ce_mask = batch["answer_mask"] if m.ce_on == "answer" else None
        loss, pg, ce = actor_loss(self.generator, layout, row, advantages, temperature=m.sampling.temperature,
                                  gamma=m.gamma, rl_coef=m.rl_coef, reduction=m.loss_reduction, ce_mask=ce_mask)
        bs = ids.shape[0]
        self.log_dict({
            "train/loss": loss.detach(), "train/pg": pg.detach(), "train/ce": ce.detach(),
            "train/reward": rewards.reward.mean(), "train/reward_std": rewards.reward.std(),
            "train/alignment": rewards.alignment.mean(), "train/alignment_std": rewards.alignment.std(),
            "train/diversity": rewards.diversity.mean(), "train/diversity_std": rewards.diversity.std(),
            "train/advantage_std": advantages.std(),
            "train/cfm": cfm_estimate(gen_f, gt_f).mean() if layout.num_samples > 1 else torch.nan,
            "train/duplicate_fraction": duplicate_fraction(tokens),
            "perf/sample_s": t1 - t0, "perf/features_rewards_s": t2 - t1,
            "perf/rollout_tokens_per_s": tokens.numel() / max(t1 - t0, 1e-9),
        }, batch_size=bs)
        self.log("train/reward_mean", rewards.reward.mean(), prog_bar=True, batch_size=bs, logger=False)
        return loss
