"""RLVR baseline: GRPO with a verifiable reward (paper §3; hyperparameters of Table 5).

One training step on a micro-batch of ``B`` prompts (``ebft.data.prompts``), ``n`` samples each:

1. Rollout (no grad, eval mode; ``ebft.rollout.completions``): the left-padded prompts are prefilled
   ONCE into a KV cache, the cache is repeated ``n`` times, and each of the ``B*n`` completions is
   sampled token by token from ``softmax(logits / temperature)`` (top-p nucleus) until it emits EOS
   or reaches ``max_new_tokens``. The counted tokens of a completion are its tokens up to and including EOS.
2. Rewards ``r_ij`` in [0, 1] from the task's verifier (``ebft.objectives.verifiable``): 1 when the
   code passes all of the row's unit tests / doctests (else 0), sentence BLEU / 100 for translation.
3. GRPO advantages, one per completion (``group_normalized_advantages``)::

       A_ij = (r_ij - mean_j' r_ij') / (s + eps),   s = std_j' r_ij'  (scale_rewards=group)
                                                    s = std of all rewards of the micro-batch (batch)
                                                    s + eps = 1 (none)

4. ONE forward with grad of the generator over ``[prompt; completion]`` gives the token log-probs
   ``log p_T(y_t | x, y_<t)`` with the logits divided by the sampling temperature (the distribution
   the tokens were drawn from, top-p truncation aside), and the loss is the token-level PPO clipped
   surrogate over all ``N`` counted tokens of the micro-batch plus an optional KL penalty
   (``grpo_loss`` and ``k3_kl`` of ``ebft.objectives.losses``)::

       rho_t = exp(log p_T(y_t) - log p_old(y_t))
       loss  = -1/N sum_t min(rho_t A, clip(rho_t, 1 - clip_eps, 1 + clip_eps) A)
               + kl_coef * 1/N sum_t k3_t,   k3_t = exp(l_t) - l_t - 1,  l_t = log p_ref(y_t) - log p_T(y_t)

   ``k3`` is Schulman's non-negative, unbiased estimator of ``KL(p_T || p_ref)`` per sampled token;
   the reference is the initial generator, used only when ``kl_coef > 0`` (paper: 0): a frozen copy,
   or with LoRA the generator itself with its adapters disabled (no copy; a warm start from a LoRA run
   starts from its adapter, so there the reference is a frozen copy of that run's merged model, and with
   ``model.quantization=4bit`` the 4-bit base loaded again under a frozen copy of that adapter: the
   initial policy exactly, never a full-precision copy).
   Without the KL term a completion with ``A = 0`` (every completion of a group whose rewards are all
   equal) adds exactly 0 to the loss and its gradient, so the forward scores only the completions
   with ``A != 0`` (one, with a zero gradient, when none has) and still divides by the ``N`` tokens
   of the whole micro-batch: the same update for less compute where rewards are sparse.

Training is online, as in the paper: one optimizer step per rollout batch (``global_batch`` prompts,
accumulated over micro-batches), so ``p_old`` is the current policy, ``rho = 1`` and the gradient is
that of ``-1/N sum_t A log p_T(y_t)``. The clip only acts for ``ppo_epochs > 1`` (several updates on
one rollout batch), which Lightning's automatic optimisation (one step per batch, with gradient
accumulation and clipping) cannot express; ``ppo_epochs`` other than 1 is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ebft.config import TrainSettings
from ebft.data.datamodule import PromptDataModule
from ebft.methods.base import FineTuneModule
from ebft.core.compat import backbone_forward, lm_head
from ebft.models.loading import load_model, resolve_attn
from ebft.models.lora import adapter_dir, adapters_disabled, frozen_adapter
from ebft.objectives.baselines import group_normalized_advantages
from ebft.objectives.losses import grpo_loss, token_logprobs
from ebft.objectives.verifiable import reward_fn_for
from ebft.rollout.completions import Rollout, positions, sample_completions, reward_completions


# ------------------------------------------------------------------------------------- update

def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """``log p_T(y_t | prompt, y_<t)`` (R, L), fp32, from ONE forward over ``[prompt; completion]``.

    ``prompt_ids``/``prompt_mask`` (R, P) left-padded, one row per completion of ``completions`` (R, L).
    Pads after EOS are attended but never scored by the caller's mask; the LM head runs only on the
    ``L`` rows that score completion tokens (``token_logprobs``, logits / temperature).
    """
    if prompt_ids.shape[0] != completions.shape[0]:
        raise ValueError(f"{completions.shape[0]} completions for {prompt_ids.shape[0]} prompt rows: "
                         "give each completion its prompt (prompt_ids[i] belongs to completions[i])")
    start = int(prompt_mask.any(0).long().argmax())  # drop columns that are padding in every row
    prompt_ids, prompt_mask = prompt_ids[:, start:], prompt_mask[:, start:]
    ids = torch.cat([prompt_ids, completions], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(completions)], 1)
    hidden, _ = backbone_forward(model, ids, positions(mask), mask)
    scoring = hidden[:, prompt_ids.shape[1] - 1:-1]
    head = lm_head(model)
    return token_logprobs(scoring, head.weight, completions, temperature=temperature, lm_head_bias=head.bias,
                          softcap=head.softcap)


def rows_to_score(advantages: torch.Tensor, all_rows: bool) -> torch.Tensor:
    """Indices of the completions the update scores: all of them (``all_rows``, for the KL term), else
    those with ``A != 0``, and the first one when none has (module docstring)."""
    keep = torch.ones_like(advantages, dtype=torch.bool) if all_rows else advantages != 0
    if not keep.any():
        keep[0] = True
    return keep.nonzero().squeeze(-1)


def zero_signal_fraction(rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of groups (rows of ``rewards`` (B, n)) whose rewards are all equal: zero advantage."""
    return (rewards.amax(-1) == rewards.amin(-1)).float().mean()


# -------------------------------------------------------------------------------------- module

@dataclass(frozen=True)
class RLVRStatistics:
    """What one RLVR update measured (detached): the loss, its policy-gradient and KL terms, the rewards
    (B, n) and advantages (B*n,), the fraction of completions the forward scored, and the rollout."""

    loss: torch.Tensor
    pg: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    scored_fraction: torch.Tensor
    rollout: Rollout

    def metrics(self) -> dict[str, torch.Tensor]:
        """The ``train/*`` metrics the RLVR module logs."""
        r, lengths = self.rewards, self.rollout.lengths.float()
        return {"train/loss": self.loss, "train/pg": self.pg, "train/kl": self.kl,
                "train/advantage_std": self.advantages.std(), "train/scored_fraction": self.scored_fraction,
                "train/reward": r.mean(), "train/reward_std": r.std(),
                "train/zero_signal_fraction": zero_signal_fraction(r),
                "train/logprob": self.rollout.logprobs.sum() / lengths.sum(), "train/completion_len": lengths.mean(),
                "train/completion_len_max": lengths.max(),
                "train/truncated_fraction": (~self.rollout.finished).float().mean()}


class RLVRModule(FineTuneModule):
    """GRPO on prompts with a verifiable reward (module docstring)."""

    @classmethod
    def make_datamodule(cls, settings: TrainSettings, tokenizer):
        return PromptDataModule(settings.data, tokenizer, settings.task.seq_len, settings.optim.batch_size,
                                settings.seed, settings.method.prompts)

    def __init__(self, settings: TrainSettings, tokenizer):
        super().__init__(settings, tokenizer)
        self.method = settings.method
        self.reward_fn = reward_fn_for(settings.task.name)
        self.kl_coef = self.method.kl_coef
        self.reference = self.load_reference() if self.kl_coef > 0 and not self.reference_is_base() else None

    def reference_is_base(self) -> bool:
        """Whether the KL reference (the initial policy) is the generator with its adapters disabled:
        LoRA on new adapters (a LoRA warm start's initial policy includes its adapter)."""
        return self.adapters is not None and adapter_dir(self.settings.model.init_from) is None

    def load_reference(self):
        """A frozen copy of the initial generator (the warm start when given) for the KL penalty; with
        ``model.quantization`` loaded in 4 bits, and from a LoRA run the 4-bit base under its adapter
        (its merged ``hf_model/`` quantised again would not be the initial policy)."""
        m, device = self.settings.model, self.settings.device
        kwargs = {"dtype": self.train_dtype, "attn_implementation": resolve_attn(m.attn_implementation, device),
                  "vocab_size": len(self.tokenizer), "quantization": m.quantization, "device": device}
        warm = adapter_dir(m.init_from)
        if m.quantization is not None and self.adapters is not None and warm is not None:
            return frozen_adapter(load_model(m.name, **kwargs), warm)
        model = load_model(m.init_from or m.name, **kwargs)
        model.eval().requires_grad_(False)
        return model

    def rollout(self, batch: dict, batch_idx: int) -> Rollout:
        m = self.method
        return sample_completions(self.generator, batch["prompt_ids"], batch["prompt_mask"], m.sampling.num_samples,
                                  m.max_new_tokens, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                  m.sampling.temperature, m.sampling.top_p, self.sampling_generator(batch_idx))

    def score(self, rollout: Rollout, rows: list[dict]) -> torch.Tensor:
        """Rewards (B, n) of the decoded completions against their rows."""
        rewards = reward_completions(rollout, rows, self.tokenizer, self.reward_fn)
        return torch.tensor(rewards, dtype=torch.float32, device=rollout.tokens.device)

    def policy_loss(self, batch: dict, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, RLVRStatistics]:
        """The loss of one update on a scored rollout, and its statistics."""
        m = self.method
        temperature = m.sampling.temperature
        advantages = group_normalized_advantages(rewards, m.scale_rewards).reshape(-1)      # (B*n,)
        rows = rows_to_score(advantages, all_rows=self.kl_coef > 0)
        prompt_of = rows // m.sampling.num_samples
        prompt_ids, prompt_mask = batch["prompt_ids"][prompt_of], batch["prompt_mask"][prompt_of]
        mask = rollout.mask[rows]
        width = max(int(mask.sum(-1).max()), 1)
        tokens, mask = rollout.tokens[rows, :width], mask[:, :width]
        logprobs = completion_logprobs(self.generator, prompt_ids, prompt_mask, tokens, temperature)
        ref_logprobs = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logprobs = completion_logprobs(self.reference, prompt_ids, prompt_mask, tokens, temperature)
        elif self.kl_coef > 0:
            with adapters_disabled(self.adapters):
                ref_logprobs = completion_logprobs(self.generator, prompt_ids, prompt_mask, tokens, temperature)
        loss, pg, kl = grpo_loss(logprobs, logprobs.detach(), advantages[rows], mask, m.clip_eps,
                                 self.kl_coef, ref_logprobs, num_tokens=int(rollout.mask.sum()))
        return loss, RLVRStatistics(loss.detach(), pg.detach(), kl.detach(), rewards, advantages,
                                    torch.tensor(len(rows) / len(advantages)), rollout)

    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        # 1. n completions per prompt from the current policy
        rollout = self.rollout(batch, batch_idx)
        t1 = time.perf_counter()
        # 2. their verifiable rewards (unit tests or BLEU), (B, n)
        rewards = self.score(rollout, batch["rows"])
        t2 = time.perf_counter()
        # 3. group-normalised advantages and the clipped policy-gradient loss (+ KL)
        loss, stats = self.policy_loss(batch, rollout, rewards)
        bs = rewards.shape[0]
        lengths = rollout.lengths.float()
        self.log_dict({**stats.metrics(), "perf/sample_s": t1 - t0, "perf/reward_s": t2 - t1,
                       "perf/rollout_tokens_per_s": float(lengths.sum()) / max(t1 - t0, 1e-9)}, batch_size=bs)
        self.log("train/reward_mean", rewards.mean(), prog_bar=True, batch_size=bs, logger=False)
        return loss
