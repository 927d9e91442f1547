"""The EBFT update (paper §2, Algorithm 1 steps 3-4) as one pure function of the rollouts and their
features: rewards -> advantages -> ``rl_coef * PG + gamma * CE``.

Shapes (B chunks, n samples per context, NB blocks, G generated tokens, D feature dimension):

    row           (B, T + n*NB*G)   the strided rows (``StridedLayout.scatter_generated``)
    tokens        (B, n, NB, G)     the sampled tokens (in ``row`` at ``layout.token_index``)
    gen_features  (B, NB, n, D)     phi(c_k : y_hat_jk), the feature network's (paper eq. 4)
    gt_features   (B, NB, D)        phi(c_k : y_k)
    block_used    (B, NB)           the blocks trained on (``method.anchors``; None: all of them)
    documents     StridedDocuments  document masking of the rows (``data.document_mask``; None: off)
    rewards       (B, NB, n)        r_j = AT_j - alpha * DT_j (eqs. 7, 9, 67; whitening per settings)
    advantages    (B, n, NB)        r_j - b_j, b_j of eq. 94 (or the ``baseline`` setting's)
    loss          ()                rl_coef * PG + gamma * CE

Unused blocks (``block_used`` False: answer anchors whose block is not in an answer) keep their place
on the fixed block grid but contribute nothing: their rewards and advantages are 0, their tokens have
no weight in the policy gradient's token mean, and every baseline is a function of one block's n
rewards only (leave-one-out or normalisation within the block's group), so an unused block is never
another block's leave-one-out partner. ``method.skip_flat_groups`` also takes the used blocks whose n
rewards are all equal out of the policy gradient.

The generator's log-probs of the generated tokens and the chunk's teacher-forced CE come from ONE
forward of the generator over the rows (:func:`actor_loss`); the caller runs the backward.
``training_step`` of ``ebft.methods.ebft`` and ``bench/step_cost.py`` call :func:`ebft_update`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ebft.config import EBFTSettings
from ebft.core.compat import lm_head
from ebft.core.documents import StridedDocuments
from ebft.core.layout import StridedLayout
from ebft.core.strided import strided_hidden
from ebft.objectives.baselines import flat_groups, fm_advantages
from ebft.objectives.losses import cross_entropy_term, policy_gradient_loss, token_logprobs
from ebft.objectives.rewards import FMRewards, cfm_estimate, feature_matching_rewards


def actor_loss(model, layout: StridedLayout, row: Tensor, advantages: Tensor, temperature: float,
               gamma: float, rl_coef: float = 1.0, reduction: str = "token_mean",
               ce_mask: Tensor | None = None, pg_blocks: Tensor | None = None,
               documents: StridedDocuments | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, pg, ce)`` of the actor update from ONE forward of ``model`` over the strided rows.

    ``row`` (B, T + n*NB*G); ``advantages`` (B, n, NB). The LM head runs only on the ``n*NB*G``
    scoring rows (``layout.score_index``, logits / temperature) and the ``T - 1`` teacher-forced rows
    of the chunk: full-length logits are never formed. The head is the model's own (bias and final
    soft-cap included, ``ebft.core.compat.lm_head``). ``ce_mask`` (B, T) marks the CE's target tokens
    (None: all); ``pg_blocks`` (B, NB) the blocks whose tokens the policy gradient counts (None: all).
    ``documents``: the forward attends within documents (``ebft.core.documents``).
    """
    layout = layout.to(row.device)
    hidden = strided_hidden(model, row, layout, documents)               # (B, T + n*NB*G, H)
    head = lm_head(model)
    targets = row[:, layout.token_index]                                 # (B, n, NB, G)
    logprobs = token_logprobs(hidden[:, layout.score_index], head.weight, targets, temperature=temperature,
                              lm_head_bias=head.bias, softcap=head.softcap)
    pg_mask = None if pg_blocks is None else layout.broadcast_to_tokens(pg_blocks.unsqueeze(1).expand_as(advantages))
    pg = policy_gradient_loss(logprobs, layout.broadcast_to_tokens(advantages), pg_mask, reduction=reduction)
    ce = cross_entropy_term(hidden[:, : layout.seq_len], head.weight, row[:, : layout.seq_len], ce_mask,
                            lm_head_bias=head.bias, softcap=head.softcap)
    return rl_coef * pg + gamma * ce, pg, ce


def duplicate_fraction(tokens: Tensor, block_used: Tensor | None = None) -> Tensor:
    """Fraction of rollouts (b, j, k) whose G tokens equal another sample's of the same context, among
    the used blocks' (all with ``block_used`` None); ``tokens`` (B, n, NB, G), ``block_used`` (B, NB)."""
    n = tokens.shape[1]
    same = (tokens.unsqueeze(2) == tokens.unsqueeze(1)).all(-1)  # (B, n, n, NB)
    same &= ~torch.eye(n, dtype=torch.bool, device=tokens.device)[None, :, :, None]
    duplicated = same.any(2)                                      # (B, n, NB)
    if block_used is None:
        return duplicated.float().mean()
    return duplicated.transpose(1, 2)[block_used].float().mean()


@dataclass(frozen=True)
class EBFTStatistics:
    """What one EBFT update measured (detached): the loss and its terms, the rewards (B, NB, n) and
    advantages (B, n, NB), the batch's CFM estimate and the fraction of duplicated rollouts (both over
    the used blocks), the used blocks (B, NB; None: all) and the flat groups (B, NB: blocks whose n
    rewards are all equal, ``ebft.objectives.baselines.flat_groups``; unused blocks, zeroed, are flat
    too, and the metric counts the used ones; None for n = 1)."""

    loss: Tensor
    pg: Tensor
    ce: Tensor
    rewards: FMRewards
    advantages: Tensor
    cfm: Tensor
    duplicate_fraction: Tensor
    block_used: Tensor | None = None
    flat: Tensor | None = None

    def metrics(self) -> dict[str, Tensor]:
        """The ``train/*`` metrics the EBFT module logs: reward, advantage and CFM statistics over the
        used blocks, ``train/blocks_used`` (their fraction of all blocks) and ``train/flat_groups``
        (the fraction of used blocks whose rewards are all equal; left out of the policy gradient with
        ``method.skip_flat_groups``)."""
        used = self.block_used

        def of_used(values: Tensor) -> Tensor:   # (B, NB, ...) -> the used blocks' values
            return values if used is None else values[used]

        r, advantages = self.rewards, self.advantages.transpose(1, 2)
        out = {"train/loss": self.loss, "train/pg": self.pg, "train/ce": self.ce,
               "train/reward": of_used(r.reward).mean(), "train/reward_std": of_used(r.reward).std(),
               "train/alignment": of_used(r.alignment).mean(), "train/alignment_std": of_used(r.alignment).std(),
               "train/diversity": of_used(r.diversity).mean(), "train/diversity_std": of_used(r.diversity).std(),
               "train/advantage_std": of_used(advantages).std(), "train/cfm": self.cfm,
               "train/duplicate_fraction": self.duplicate_fraction,
               "train/blocks_used": self.loss.new_ones(()) if used is None else used.float().mean()}
        if self.flat is not None:
            out["train/flat_groups"] = of_used(self.flat).float().mean()
        return out


def ebft_update(generator, layout: StridedLayout, row: Tensor, tokens: Tensor, gen_features: Tensor,
                gt_features: Tensor, method: EBFTSettings, answer_mask: Tensor | None = None,
                block_used: Tensor | None = None,
                documents: StridedDocuments | None = None) -> tuple[Tensor, EBFTStatistics]:
    """The loss of one EBFT update (shapes in the module docstring) and its statistics.

    Rewards ``r_j = AT_j - alpha * DT_j`` with ``method.whitening`` (eqs. 7-9, 67), zero on the blocks
    ``block_used`` leaves out; advantages under ``method.baseline`` (eq. 94 by default; zero rewards give
    zero advantages under every baseline); then ``method.rl_coef * PG + method.gamma * CE`` with the
    policy gradient's log-probs at ``method.sampling.temperature`` reduced by ``method.loss_reduction``
    over the tokens of the used (and, with ``method.skip_flat_groups``, not flat) blocks, and the CE over
    all chunk tokens or, with ``method.ce_on == "answer"``, those ``answer_mask`` marks; the generator's
    forward attends within ``documents`` when given (document masking).
    """
    rewards = feature_matching_rewards(gen_features, gt_features, method.alpha, method.whitening)   # (B, NB, n)
    if block_used is not None:
        rewards = rewards.kept(block_used)
    advantages = fm_advantages(rewards, method.alpha, method.baseline).transpose(-1, -2)           # (B, n, NB)
    flat = flat_groups(rewards.reward) if layout.num_samples > 1 else None                         # (B, NB)
    trained = block_used
    if method.skip_flat_groups:
        trained = ~flat if trained is None else trained & ~flat
    if method.ce_on == "answer" and answer_mask is None:
        raise ValueError("method.ce_on=answer needs the chunks' answer_mask")
    ce_mask = answer_mask if method.ce_on == "answer" else None
    loss, pg, ce = actor_loss(generator, layout, row, advantages, temperature=method.sampling.temperature,
                              gamma=method.gamma, rl_coef=method.rl_coef, reduction=method.loss_reduction,
                              ce_mask=ce_mask, pg_blocks=trained, documents=documents)
    if layout.num_samples > 1:
        per_block = cfm_estimate(gen_features, gt_features)
        cfm = (per_block if block_used is None else per_block[block_used]).mean()
    else:
        cfm = torch.tensor(float("nan"))
    stats = EBFTStatistics(loss.detach(), pg.detach(), ce.detach(), rewards, advantages,
                           cfm, duplicate_fraction(tokens, block_used), block_used, flat)
    return loss, stats
