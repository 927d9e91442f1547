"""The RLVR objective of a model: its mean verifiable reward on a fixed set of prompts.

For each prompt ``x_i`` of a fixed random subset of the held-out (or training) prompts, ``n``
completions ``y_ij`` are sampled as RLVR samples them during training (``method.temperature``,
``method.top_p``, ``method.max_new_tokens``, stop at EOS) and scored by the task's verifier
(code: unit tests or doctests in the sandbox; translation: sentence BLEU):

    R = 1/(P n) sum_i sum_j r(x_i, y_ij),        solved = 1/P sum_i max_j r(x_i, y_ij)

Running it on the base model and on an RLVR run gives "the mean reward before and after"
training on the same prompts, samples drawn from the same seed:

    python -m ebft.eval.verifiable_reward --ckpt embedded:smollm2-135m-instruct \\
        --ckpt results/repro_small/runs/rlvr/<run> data.mbpp_path=<your copy of mbpp.jsonl>

Trailing ``key=value`` arguments are ``train.py`` overrides (``method=rlvr`` is implied): they pick
the task, the data and the sampling settings.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ebft.config import compose_config, validate_rlvr
from ebft.data.prompts import left_pad_collate, select_prompts
from ebft.data.sources import load_rows, train_val_split
from ebft.methods.rlvr import check_config, sample_completions, score_completions
from ebft.models.loading import load_model, load_tokenizer
from ebft.objectives.verifiable import reward_fn_for

log = logging.getLogger(__name__)

SPLITS = ("val", "train")


@dataclass(frozen=True)
class Prompts:
    """Prompt rows (with what their verifier needs) and their token ids."""

    rows: list[dict]
    ids: list[list[int]]


@dataclass(frozen=True)
class RewardEstimate:
    mean: float                  # R: mean reward over all prompts and samples
    solved: float                # mean over prompts of the best of their n rewards
    completion_len: float        # mean completion length in tokens
    per_prompt: list[list[float]]


def fixed_prompts(cfg: DictConfig, tokenizer, split: str, limit: int | None, seed: int) -> Prompts:
    """The RLVR prompts of ``split`` (the rows ``train.py`` trains or validates on, filtered as for
    training), a fixed random subset of ``limit`` of them (all when None)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    rows = load_rows(cfg.data, str(cfg.task.name))
    train_rows, val_rows = train_val_split(rows, int(cfg.data.val_size), int(cfg.data.seed))
    kept, ids = select_prompts(val_rows if split == "val" else train_rows, str(cfg.task.name), tokenizer,
                               int(cfg.method.max_prompt_tokens), bool(cfg.method.check_references),
                               bool(cfg.data.get("chat_template", False)))
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1")
        order = order[:limit]
    return Prompts([kept[i] for i in order], [ids[i] for i in order])


def mean_reward(model, tokenizer, prompts: Prompts, reward_fn, num_samples: int, max_new_tokens: int,
                temperature: float, top_p: float, batch_size: int, seed: int) -> RewardEstimate:
    """Sample ``num_samples`` completions per prompt (batch ``i`` draws from ``seed + i``, so every
    model sees the same random numbers) and score them; see the module docstring."""
    collate = left_pad_collate(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    per_prompt, lengths = [], []
    starts = range(0, len(prompts.rows), batch_size)
    for i, start in enumerate(tqdm(starts, desc="verifiable reward", unit="batch")):
        batch = collate([{"prompt_ids": p, "row": r} for p, r in
                         zip(prompts.ids[start:start + batch_size], prompts.rows[start:start + batch_size])])
        generator = torch.Generator(device=device).manual_seed(seed + i)
        rollout = sample_completions(model, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device),
                                     num_samples, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                     temperature, top_p, generator)
        per_prompt += score_completions(rollout, batch["rows"], tokenizer, reward_fn)
        lengths += rollout.lengths.tolist()
    flat = [r for group in per_prompt for r in group]
    return RewardEstimate(mean=sum(flat) / len(flat), solved=sum(max(g) for g in per_prompt) / len(per_prompt),
                          completion_len=sum(lengths) / len(lengths), per_prompt=per_prompt)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m ebft.eval.verifiable_reward",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", required=True,
                        help="model: HF dir, run dir (its hf_model/), .gguf, hub id or embedded:...; repeatable")
    parser.add_argument("--prompts", type=int, default=32, help="prompts (a fixed random subset; default 32)")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--split", choices=SPLITS, default="val", help="held-out (default) or training prompts")
    parser.add_argument("--batch", type=int, default=4, help="prompts per sampling batch (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. task=translation method.max_new_tokens=96")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose_config("train", ["method=rlvr", *args.overrides])
    validate_rlvr(cfg)
    check_config(cfg)
    m = cfg.method
    tokenizer = load_tokenizer(str(cfg.model.name))
    prompts = fixed_prompts(cfg, tokenizer, args.split, args.prompts, args.seed)
    reward_fn = reward_fn_for(str(cfg.task.name))
    results = []
    for ckpt in args.ckpt:
        model = load_model(ckpt, vocab_size=len(tokenizer)).eval()
        estimate = mean_reward(model, tokenizer, prompts, reward_fn, args.samples, int(m.max_new_tokens),
                               float(m.temperature), float(m.top_p), args.batch, args.seed)
        results.append({"ckpt": ckpt, "split": args.split, "prompts": len(prompts.rows), "samples": args.samples,
                        "max_new_tokens": int(m.max_new_tokens), "temperature": float(m.temperature),
                        "seed": args.seed, "mean_reward": estimate.mean, "solved": estimate.solved,
                        "completion_len": estimate.completion_len, "per_prompt": estimate.per_prompt})
        del model
    print(f"\n{len(prompts.rows)} {args.split} prompts of {cfg.task.name} x {args.samples} samples at temperature "
          f"{float(m.temperature)}, <= {int(m.max_new_tokens)} new tokens, seed {args.seed}")
    print("| model | mean reward | solved (best of n) | completion tokens |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['ckpt']} | {r['mean_reward']:.4f} | {r['solved']:.4f} | {r['completion_len']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
