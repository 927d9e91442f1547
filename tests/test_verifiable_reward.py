"""The verifiable-reward metric of evaluate.py (the RLVR objective before / after training)."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ebft.config import ConfigError, RewardSettings, evaluate_settings
from ebft.data.prompts import left_pad_collate, select_prompts
from ebft.eval.runner import evaluate, held_out, plan_metrics
from ebft.eval.verifiable_reward import fixed_prompts, mean_reward
from ebft.models.loading import build_tiny_model, load_tokenizer
from ebft.objectives.verifiable import reward_fn_for
from ebft.rollout.completions import sample_completions

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["task=translation", "model=tiny", "data.limit=300", "data.val_size=40"]


def make_settings(output_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*SMALL, *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return evaluate_settings(cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok, settings = load_tokenizer("tiny"), make_settings(tmp_path_factory.mktemp("cfg"))
    return held_out(settings.data, tok, settings.task.seq_len).rows, settings.data, tok


def length_reward(texts, rows):
    """A reward that depends on every sampled token (through the decoded length)."""
    assert len(texts) == len(rows)
    return [(len(t) % 7) / 6 for t in texts]


def test_fixed_prompts_are_a_seeded_subset_of_the_held_out_prompts(setup):
    rows, data, tok = setup
    every = fixed_prompts(rows, data, tok, RewardSettings(prompts=None), seed=0)
    kept, _ = select_prompts(rows, "translation", tok, 1024, True)
    assert sorted(r["question"] for r in every.rows) == sorted(r["question"] for r in kept) and len(kept) > 5
    first = fixed_prompts(rows, data, tok, RewardSettings(prompts=5), seed=0)
    assert len(first.rows) == 5 and all(r in every.rows for r in first.rows)
    assert first.rows == fixed_prompts(rows, data, tok, RewardSettings(prompts=5), seed=0).rows
    assert first.rows != fixed_prompts(rows, data, tok, RewardSettings(prompts=5), seed=1).rows
    for row, ids in zip(first.rows, first.ids):
        assert ids == tok(row["question"], add_special_tokens=False)["input_ids"]


def test_mean_reward_equals_scoring_the_samples_by_hand(setup):
    rows, data, tok = setup
    settings = RewardSettings(prompts=5, num_samples=3, max_new_tokens=6, batch_size=2)
    prompts = fixed_prompts(rows, data, tok, settings, seed=0)
    model = build_tiny_model()
    est = mean_reward(model, tok, prompts, length_reward, settings, seed=7)
    expected = []
    for i, start in enumerate(range(0, 5, 2)):
        batch = left_pad_collate(tok.pad_token_id)(
            [{"prompt_ids": p, "row": r} for p, r in zip(prompts.ids[start:start + 2], prompts.rows[start:start + 2])])
        rollout = sample_completions(model, batch["prompt_ids"], batch["prompt_mask"], 3, 6, tok.eos_token_id,
                                     tok.pad_token_id, 1.0, 1.0, torch.Generator().manual_seed(7 + i))
        texts = tok.batch_decode(rollout.tokens, skip_special_tokens=True)
        expected += [length_reward(texts[j:j + 3], [None] * 3) for j in range(0, len(texts), 3)]
    assert est.per_prompt == expected and len(expected) == 5
    flat = [r for g in expected for r in g]
    assert est.mean == pytest.approx(sum(flat) / 15)
    assert est.solved == pytest.approx(sum(max(g) for g in expected) / 5) and est.solved >= est.mean
    assert 1 <= est.completion_len <= 6
    again = mean_reward(model, tok, prompts, length_reward, settings, seed=7)
    assert again.per_prompt == est.per_prompt                       # same seed, same samples


def test_evaluate_reward_metric_scores_each_checkpoint_on_the_same_prompts(tmp_path, setup):
    rows, data, tok = setup
    request = make_settings(tmp_path, "metrics=[reward]", "ckpt=[tiny,tiny]", "eval.reward.prompts=3",
                            "eval.reward.num_samples=2", "eval.reward.max_new_tokens=6", "eval.reward.batch_size=2")
    text = evaluate(request)
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("00-tiny_base", "01-tiny_base")]
    first, second = (r["downstream"]["reward"] for r in results)
    assert first == second                                          # identical models, identical draws
    settings = RewardSettings(prompts=3, num_samples=2, max_new_tokens=6, batch_size=2)
    prompts = fixed_prompts(rows, data, tok, settings, seed=request.seed)
    model = build_tiny_model(vocab_size=len(tok), seed=0).eval()   # what model=tiny loads
    expected = mean_reward(model, tok, prompts, reward_fn_for("translation"), settings, seed=request.seed)
    assert first == pytest.approx({"mean": expected.mean, "solved": expected.solved,
                                   "completion tokens": expected.completion_len})
    records = [json.loads(line) for line in (tmp_path / "00-tiny_base" / "reward_samples.jsonl").open()]
    assert [r["rewards"] for r in records] == expected.per_prompt and len(records) == 3
    assert text.splitlines()[0] == "| model | reward mean | reward solved | reward completion tokens |"


def test_reward_is_asked_for_and_checked_before_anything_loads(tmp_path):
    def planned(settings):
        return plan_metrics(settings.task, settings.eval.benchmarks, settings.metrics)

    assert "reward" not in planned(make_settings(tmp_path))          # not part of the default metrics
    with pytest.raises(ConfigError, match="not offered by task=unstructured_code"):
        planned(make_settings(tmp_path, "task=unstructured_code", "metrics=[reward]"))
    with pytest.raises(ConfigError, match="eval.reward.num_samples=0"):
        make_settings(tmp_path, "metrics=[reward]", "eval.reward.num_samples=0")
