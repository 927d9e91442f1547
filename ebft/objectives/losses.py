"""Losses of the actor update: token log-probs without full-vocabulary logits, the
policy-gradient loss (paper eq. 7 and the authors' token mean), PPO's clipped loss and GRPO's
loss with its k3 KL estimator (RLVR), and the cross-entropy term ``gamma * CE``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ebft.config import REDUCTIONS



def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on for the weight's device, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) is not None:
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                  softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """fp32 ``cap(h W^T + b) / T`` of one chunk of rows (the operands already in the compute dtype),
    and ``tanh((h W^T + b) / softcap)`` when soft-capped (its derivative is ``1 - tanh^2``)."""
    logits = F.linear(hidden, weight, bias).float()
    capped = None
    if softcap is not None:
        capped = logits.div_(softcap).tanh_()
        logits = capped * softcap
    return (logits.div_(temperature) if temperature != 1.0 else logits), capped


class _TokenLogprobs(torch.autograd.Function):
    """``log_softmax(cap(h W^T + b) / T)[target]`` chunk by chunk, holding one chunk of logits at a time.

    The forward keeps only its inputs and the per-row log-sum-exp; the backward recomputes each
    chunk's logits and forms ``d logp / d z = (onehot - softmax) / T * cap'(z)`` in place
    (``cap'(z) = 1 - tanh^2(z / softcap)`` when soft-capped, else 1), so neither pass holds more than
    ``chunk_size x V`` fp32 values and no autograd graph of vocab-wide tensors exists.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, compute_dtype, softcap):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, targets.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits, _ = _chunk_logits(hidden[rows].to(compute_dtype), w, b, temperature, softcap)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                out[rows] = logits.gather(-1, targets[rows, None])[:, 0] - lse[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_size, ctx.compute_dtype, ctx.softcap = temperature, chunk_size, compute_dtype, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, chunk_size, dtype = ctx.temperature, ctx.chunk_size, ctx.compute_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, targets.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h, g = hidden[rows].to(dtype), grad_out[rows]
                logits, capped = _chunk_logits(h, w, b, temperature, ctx.softcap)
                d_logits = logits.sub_(lse[rows, None]).exp_().mul_(g[:, None].neg() / temperature)
                d_logits.scatter_add_(-1, targets[rows, None], g[:, None] / temperature)
                if capped is not None:
                    d_logits.mul_(capped.square_().neg_().add_(1))
                if need_b:
                    grad_b += d_logits.sum(0)
                d_logits = d_logits.to(dtype)
                if need_h:
                    grad_h[rows] = (d_logits @ w).to(grad_h.dtype)
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(d_logits.t(), h)
                elif need_w:
                    grad_w += (d_logits.t() @ h).float()
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def token_logprobs(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024, lm_head_bias: Tensor | None = None,
                   softcap: float | None = None) -> Tensor:
    """``log p_T(target)`` from final hidden states, fp32, shape of ``targets``.

    ``log p_T(v | h) = log_softmax(cap(h W^T + b) / T)_v`` with ``hidden (..., H)``,
    ``lm_head_weight (V, H)``, ``targets (...)`` and ``cap(z) = softcap * tanh(z / softcap)`` for a
    family that soft-caps its final logits (``softcap=None``: ``cap(z) = z``); pass the model's head
    as ``ebft.core.compat.lm_head`` gives it (weight, bias, softcap). Rows are processed ``chunk_size`` at a
    time by one autograd function that recomputes each chunk's logits in the backward, so
    neither the forward nor the backward pass ever holds more than ``chunk_size x V`` fp32
    logits (the forward keeps only its inputs and one log-sum-exp per row). The matmul runs in
    the weights' dtype (autocast's under autocast) and its output is cast to fp32 (as the
    logits of the model would be). ``temperature`` is the sampling temperature: the authors
    score generated tokens with the logits divided by it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + (H,)")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} must be (vocab, {hidden.shape[-1]})")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap!r} must be > 0 (None: no soft-capping)")
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = _TokenLogprobs.apply(flat_hidden, lm_head_weight, lm_head_bias, flat_targets, float(temperature),
                               chunk_size, _compute_dtype(lm_head_weight), softcap)
    return out.reshape(targets.shape)


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
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {REDUCTIONS}")
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


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token ``k3 = exp(l) - l - 1`` with ``l = log p_ref - log p``: Schulman's non-negative estimator
    of ``KL(p || p_ref)``, unbiased for tokens sampled from ``p``. ``ref_logprobs`` are constants."""
    delta = ref_logprobs.detach() - logprobs
    return torch.exp(delta) - delta - 1


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, kl_coef: float = 0.0, ref_logprobs: torch.Tensor | None = None,
              num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, pg, kl)`` of GRPO (RLVR): the token-level clipped surrogate (:func:`ppo_clipped_loss`)
    with per-completion ``advantages`` (R,) broadcast over its tokens, plus ``kl_coef`` times the token
    mean of :func:`k3_kl` against the reference's ``ref_logprobs``::

        loss = -1/N sum_t min(rho_t A, clip(rho_t, 1 - clip_eps, 1 + clip_eps) A) + kl_coef * 1/N sum_t k3_t

    Both means divide by ``N = num_tokens`` (default: the tokens ``mask`` counts here), so a caller
    that scores only some completions of a batch still divides by the tokens of all of them."""
    counted = int(mask.sum())
    scale = counted / num_tokens if num_tokens else 1.0
    pg = ppo_clipped_loss(logprobs, old_logprobs, advantages[:, None].expand_as(logprobs), mask, clip_eps) * scale
    if kl_coef == 0:
        return pg, pg, torch.zeros_like(pg)
    if ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs the reference model's log-probs")
    kl = (k3_kl(logprobs, ref_logprobs) * mask).sum() / max(counted, 1) * scale
    return pg + kl_coef * kl, pg, kl


def cross_entropy_term(hidden: Tensor, lm_head_weight: Tensor, input_ids: Tensor, loss_mask: Tensor | None = None,
                       chunk_size: int = 1024, lm_head_bias: Tensor | None = None,
                       softcap: float | None = None) -> Tensor:
    """Teacher-forced CE of the chunk, the ``gamma * CE`` term of the loss.

    ``CE = mean over counted t in 0..T-2 of -log p(x_{t+1} | x_{<=t})`` (temperature 1), with
    ``hidden (..., T, H)`` the final hidden states of ``input_ids (..., T)``. ``loss_mask``
    ``(..., T)`` marks the TARGET tokens that count (None: every token, the authors' choice; an
    answer mask: answer tokens only); the first token is never a target. The LM head runs on the
    counted targets only. The mean runs over all counted tokens of the batch; none counted gives 0.
    ``lm_head_bias`` and ``softcap`` as in :func:`token_logprobs`.
    """
    if hidden.shape[:-1] != input_ids.shape or input_ids.ndim < 1:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be input_ids {tuple(input_ids.shape)} + (H,)")
    if loss_mask is not None and loss_mask.shape != input_ids.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the input_ids shape {tuple(input_ids.shape)}")
    hidden, targets = hidden[..., :-1, :], input_ids[..., 1:]
    if loss_mask is not None:
        counted = loss_mask[..., 1:].bool()
        hidden, targets = hidden[counted], targets[counted]
    logprobs = token_logprobs(hidden, lm_head_weight, targets, chunk_size=chunk_size, lm_head_bias=lm_head_bias,
                              softcap=softcap)
    return -logprobs.sum() / max(logprobs.numel(), 1)
