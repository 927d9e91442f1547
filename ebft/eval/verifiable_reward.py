"""The RLVR objective of a model: its mean verifiable reward on fixed held-out prompts, the ``reward``
metric of ``python evaluate.py``.

For each prompt ``x_i`` of a fixed random subset of the held-out prompts (the validation rows of
training, filtered as RLVR filters its prompts), ``n`` completions ``y_ij`` are sampled as RLVR
samples them during training (temperature, top-p, at most ``max_new_tokens``, stop at EOS) and scored
by the task's verifier (code: unit tests or doctests in the sandbox; translation: sentence BLEU):

    R = 1/(P n) sum_i sum_j r(x_i, y_ij),        solved = 1/P sum_i max_j r(x_i, y_ij)

Evaluating the base model and an RLVR run together gives the mean reward before and after training
on the same prompts, the samples of prompt batch ``b`` drawn from ``seed + b`` for every model:

    python evaluate.py 'metrics=[reward]' 'ckpt=[embedded:smollm2-135m-instruct,outputs/qa_code/rlvr/<run>]'

Settings: ``eval.reward`` (``conf/eval/default.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ebft.config import ConfigError, DataSettings, RewardSettings, DecodingSettings
from ebft.data.heldout import Prompts, prompts_of
from ebft.data.prompts import left_pad_collate
from ebft.eval.downstream import Outcome
from ebft.rollout.completions import sample_completions, reward_completions

RewardFn = Callable[[list[str], list[dict]], list[float]]


@dataclass(frozen=True)
class RewardEstimate:
    mean: float                  # R: mean reward over all prompts and samples
    solved: float                # mean over prompts of the best of their n rewards
    completion_len: float        # mean completion length in tokens
    per_prompt: list[list[float]]


def fixed_prompts(rows: Sequence[dict], data: DataSettings, tokenizer, settings: RewardSettings,
                  seed: int) -> Prompts:
    """The RLVR prompts of the held-out ``rows`` (of ``ebft.data.heldout``'s split, filtered as for
    training), a fixed random subset of ``settings.prompts`` of them (all when None) in the order of a
    ``seed``-ed permutation."""
    selected = prompts_of(list(rows), data, tokenizer, settings.prompt_selection)
    kept, ids = selected.rows, selected.ids
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()[:settings.prompts]
    return Prompts([kept[i] for i in order], [ids[i] for i in order])


def mean_reward(model, tokenizer, prompts: Prompts, reward_fn: RewardFn, settings: RewardSettings, seed: int,
                progress: bool = True) -> RewardEstimate:
    """Sample ``settings.num_samples`` completions per prompt (batch ``b`` draws from ``seed + b``, so
    every model sees the same random numbers) and score them; see the module docstring."""
    collate = left_pad_collate(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    per_prompt, lengths = [], []
    size = settings.batch_size
    starts = range(0, len(prompts.rows), size)
    for b, start in enumerate(tqdm(starts, desc="verifiable reward", unit="batch", disable=not progress)):
        batch = collate([{"prompt_ids": p, "row": r} for p, r in
                         zip(prompts.ids[start:start + size], prompts.rows[start:start + size])])
        generator = torch.Generator(device=device).manual_seed(seed + b)
        rollout = sample_completions(model, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device),
                                     settings.num_samples, settings.max_new_tokens, tokenizer.eos_token_id,
                                     tokenizer.pad_token_id, settings.temperature, settings.top_p, generator)
        per_prompt += reward_completions(rollout, batch["rows"], tokenizer, reward_fn)
        lengths += rollout.lengths.tolist()
    flat = [r for group in per_prompt for r in group]
    return RewardEstimate(mean=sum(flat) / len(flat), solved=sum(max(g) for g in per_prompt) / len(per_prompt),
                          completion_len=sum(lengths) / len(lengths), per_prompt=per_prompt)


@dataclass(frozen=True)
class RewardBenchmark:
    """The ``reward`` metric as one of evaluate.py's benchmarks: scores ``{"reward": {"mean", "solved",
    "completion tokens"}}`` and one record per prompt with its rewards."""

    prompts: Prompts
    reward_fn: RewardFn
    settings: RewardSettings
    seed: int
    name: str = "reward"

    def __post_init__(self):
        if not self.prompts.rows:
            raise ConfigError("metrics has reward but no held-out prompt has a verifier within "
                              f"eval.reward.max_prompt_tokens={self.settings.max_prompt_tokens}: raise "
                              "data.val_size or eval.reward.max_prompt_tokens")

    def run(self, model, tokenizer, sampling: DecodingSettings, progress: bool = True) -> Outcome:
        """``sampling`` (the benchmarks' settings) is not used: the reward samples as RLVR does."""
        est = mean_reward(model, tokenizer, self.prompts, self.reward_fn, self.settings, self.seed, progress)
        scores = {"mean": est.mean, "solved": est.solved, "completion tokens": est.completion_len}
        records = [{"prompt": i, "rewards": rewards} for i, rewards in enumerate(est.per_prompt)]
        return Outcome({self.name: scores}, records)
