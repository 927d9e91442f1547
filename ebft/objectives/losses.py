"""Losses of the actor update: token log-probs without full-vocabulary logits, the
policy-gradient loss (paper eq. 7 and the authors' token mean), PPO's clipped loss (RLVR)
and the cross-entropy term ``gamma * CE``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

PG_REDUCTIONS = ("token_mean", "sequence_sum")


def _chunk_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                    temperature: float) -> Tensor:
    """``log_softmax((h W^T + b) / T)[target]`` for one chunk of rows, logits in fp32."""
    logits = F.linear(hidden, weight, bias).float() / temperature
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024, lm_head_bias: Tensor | None = None) -> Tensor:
    """``log p_T(target)`` from final hidden states, fp32, shape of ``targets``.

    ``log p_T(v | h) = log_softmax((h W^T + b) / T)_v`` with ``hidden (..., H)``,
    ``lm_head_weight (V, H)`` and ``targets (...)``. Rows are processed ``chunk_size`` at a
    time and each chunk runs under activation checkpointing, so neither the forward nor the
    backward pass ever holds more than ``chunk_size x V`` fp32 logits. The matmul runs in
    the weights' dtype and its output is cast to fp32 (as the logits of the model would be).
    ``temperature`` is the sampling temperature: the authors score generated tokens with
    the logits divided by it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + (H,)")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} must be (vocab, {hidden.shape[-1]})")
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias))
    pieces = []
    for start in range(0, max(flat_targets.shape[0], 1), chunk_size):  # once even with no rows
        args = (flat_hidden[start:start + chunk_size], lm_head_weight, lm_head_bias,
                flat_targets[start:start + chunk_size], temperature)
        pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if needs_graph
                      else _chunk_logprobs(*args))
    return torch.cat(pieces).reshape(targets.shape)


def _masked_mean(values: Tensor, mask: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` over ``dims`` counting only ``mask`` entries; 0 where none count.

    Returns the means and a bool tensor telling which ones had at least one entry.
    """
    count = mask.sum(dims)
    return (values * mask).sum(dims) / count.clamp_min(1), count > 0


def _mean_over_nonempty(values: Tensor, nonempty: Tensor) -> Tensor:
    """Mean of ``values`` where ``nonempty``; 0 (still in the graph) if nothing is."""
    return (values * nonempty).sum() / nonempty.sum().clamp_min(1)


def _token_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones_like(like)
    try:
        return torch.broadcast_to(mask, like.shape).to(like.dtype)
    except RuntimeError as err:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to the token grid {tuple(like.shape)}") from err


def policy_gradient_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None,
                         reduction: str = "token_mean") -> Tensor:
    """REINFORCE loss ``-A * log p`` on a token grid ``(..., n, NB, G)``.

    ``advantages`` (broadcast per token, same grid) are constants: they are detached here.
    ``mask`` (same grid, optional) marks the tokens that count.

    * ``"token_mean"`` (the authors' code, default): mean of ``-A log p`` over the
      ``NB * G`` tokens of each row ``(..., j)`` (one sample of one chunk), then mean over
      rows. The authors keep one row per sample, so this is their per-row token mean then
      mean over samples and chunks; with all rows holding the same number of tokens it is
      also the mean over all ``n * NB * G`` generated tokens of a chunk. It is ``G`` times
      smaller than eq. 7.
    * ``"sequence_sum"`` (eq. 7): ``-A log p(y_hat | c)`` with the sum over the ``G`` tokens
      of each completion ``(..., j, k)``, then mean over samples, blocks and chunks.

    Rows (or completions) with no counted token are left out of the outer mean. The value
    differs from the authors' ``-A * exp(log p - log p.detach())`` but the gradient is the same.
    """
    if reduction not in PG_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {PG_REDUCTIONS}")
    if logprobs.ndim < 3:
        raise ValueError(f"logprobs must be a token grid (..., n, NB, G); got {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be broadcast per token to the "
                         f"log-prob grid {tuple(logprobs.shape)} first")
    weights = _token_mask(mask, logprobs)
    per_token = -advantages.detach() * logprobs
    if reduction == "token_mean":
        per_row, nonempty = _masked_mean(per_token, weights, (-2, -1))
        return _mean_over_nonempty(per_row, nonempty)
    per_sequence = (per_token * weights).sum(-1)
    return _mean_over_nonempty(per_sequence, weights.sum(-1) > 0)


def ppo_clipped_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None,
                     clip_eps: float = 0.2) -> Tensor:
    """PPO/GRPO clipped surrogate, token level, for RLVR.

    ``rho = exp(log p - log p_old)``, loss ``= -mean_tokens min(rho A, clip(rho, 1-eps, 1+eps) A)``
    over all counted tokens of the batch (``mask``). ``old_logprobs`` and ``advantages`` are
    constants. At the first update ``rho = 1``: the gradient is that of ``-A log p``.
    No counted token gives a loss of 0.
    """
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps={clip_eps!r} must be in (0, 1); PPO's usual value is 0.2")
    if old_logprobs.shape != logprobs.shape or advantages.shape != logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} and advantages {tuple(advantages.shape)} "
                         f"must have the log-prob shape {tuple(logprobs.shape)}")
    weights = _token_mask(mask, logprobs)
    advantages = advantages.detach()
    ratio = torch.exp(logprobs - old_logprobs.detach())
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    return -(surrogate * weights).sum() / weights.sum().clamp_min(1)


def cross_entropy_term(hidden: Tensor, lm_head_weight: Tensor, input_ids: Tensor, loss_mask: Tensor | None = None,
                       chunk_size: int = 1024, lm_head_bias: Tensor | None = None) -> Tensor:
    """Teacher-forced CE of the chunk, the ``gamma * CE`` term of the loss.

    ``CE = mean over counted t in 0..T-2 of -log p(x_{t+1} | x_{<=t})`` (temperature 1), with
    ``hidden (..., T, H)`` the final hidden states of ``input_ids (..., T)``. ``loss_mask``
    ``(..., T)`` marks the TARGET tokens that count (all ones: every token, the authors'
    choice; an answer mask: answer tokens only); the first token is never a target. The mean
    runs over all counted tokens of the batch; none counted gives 0.
    """
    if hidden.shape[:-1] != input_ids.shape or input_ids.ndim < 1:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be input_ids {tuple(input_ids.shape)} + (H,)")
    logprobs = token_logprobs(hidden[..., :-1, :], lm_head_weight, input_ids[..., 1:],
                              chunk_size=chunk_size, lm_head_bias=lm_head_bias)
    if loss_mask is not None and loss_mask.shape != input_ids.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the input_ids shape {tuple(input_ids.shape)}")
    weights = torch.ones_like(logprobs) if loss_mask is None else loss_mask[..., 1:].to(logprobs.dtype)
    return -(logprobs * weights).sum() / weights.sum().clamp_min(1)
