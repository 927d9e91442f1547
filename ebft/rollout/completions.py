"""Sampling completions of prompts (RLVR's rollout, paper §3): the left-padded prompts are prefilled
ONCE into a KV cache, the cache is repeated ``n`` times, and each of the ``B*n`` completions is sampled
token by token from ``softmax(logits / temperature)`` (top-p nucleus, ``ebft.rollout.sampler``'s
``sample_from_logits``) until it emits EOS or reaches ``max_new_tokens``. The counted tokens of a
completion are its tokens up to and including EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebft.core.compat import backbone_forward, lm_head, new_cache
from ebft.rollout.sampler import sample_from_logits


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (pads get 0 too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class Rollout:
    """``n`` completions per prompt, sample-major per prompt (row ``i*n + j`` = sample j of prompt i).

    ``tokens`` (B*n, L) right-padded with ``pad_id``; ``mask`` (B*n, L) marks the counted tokens (up to
    and including EOS); ``finished`` (B*n,) whether the completion ended with EOS; ``logprobs`` (B*n, L)
    the sampling policy's ``log p_T`` of each counted token (0 elsewhere), fp32.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    finished: torch.Tensor
    logprobs: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_samples: int,
                       max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> Rollout:
    """Sample ``num_samples`` completions of each left-padded prompt (B, P) with a KV cache.

    The prompts are prefilled once and the cache repeated ``num_samples`` times; every step feeds the
    ``B*n`` newest tokens and applies the LM head to them only. A completion stops at ``eos_id``; the
    loop stops when all have, or after ``max_new_tokens`` tokens.
    """
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and num_samples={num_samples} must be >= 1")
    was_training = model.training
    model.eval()
    head = lm_head(model)
    try:
        cache = new_cache(model)
        hidden, cache = backbone_forward(model, prompt_ids, positions(prompt_mask), prompt_mask, cache)
        cache.batch_repeat_interleave(num_samples)
        mask = prompt_mask.repeat_interleave(num_samples, 0)
        next_pos = positions(mask)[:, -1] + 1
        logits = head.logits(hidden[:, -1]).repeat_interleave(num_samples, 0)
        rows = mask.shape[0]
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
        done = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
        counted = torch.zeros_like(tokens, dtype=torch.bool)
        logprobs = torch.zeros_like(tokens, dtype=torch.float32)
        for t in range(max_new_tokens):
            counted[:, t] = ~done
            drawn = sample_from_logits(logits, temperature, top_p, generator)
            drawn_logprob = (logits.float() / temperature).log_softmax(-1).gather(-1, drawn[:, None])[:, 0]
            logprobs[:, t] = torch.where(done, 0.0, drawn_logprob)
            tokens[:, t] = torch.where(done, pad_id, drawn)
            done |= tokens[:, t] == eos_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
            hidden, cache = backbone_forward(model, tokens[:, t:t + 1], (next_pos + t)[:, None], mask, cache)
            logits = head.logits(hidden[:, -1])
    finally:
        model.train(was_training)
    width = max(int(counted.sum(-1).max()), 1)
    return Rollout(tokens[:, :width], counted[:, :width], done, logprobs[:, :width])


def reward_completions(rollout: Rollout, rows: list[dict], tokenizer, reward_fn) -> list[list[float]]:
    """Rewards of the B*n decoded completions of ``rollout`` (n per row, in row order), one list per row."""
    n = rollout.tokens.shape[0] // len(rows)
    texts = tokenizer.batch_decode(rollout.tokens, skip_special_tokens=True)
    rewards = reward_fn(texts, [row for row in rows for _ in range(n)])
    return [rewards[i:i + n] for i in range(0, len(rewards), n)]
