"""The verifiable-reward evaluation (the RLVR objective before / after training)."""

import json

import pytest
import torch

from ebft.config import compose_config
from ebft.data.prompts import left_pad_collate
from ebft.eval.verifiable_reward import fixed_prompts, main, mean_reward
from ebft.methods.rlvr import sample_completions
from ebft.models.loading import build_tiny_model, load_tokenizer

OVERRIDES = ["method=rlvr", "task=translation", "model=tiny", "data.limit=300", "data.val_size=40",
             "method.max_new_tokens=6"]


@pytest.fixture(scope="module")
def setup():
    cfg = compose_config("train", OVERRIDES)
    return cfg, load_tokenizer("tiny")


def length_reward(texts, rows):
    """A reward that depends on every sampled token (through the decoded length)."""
    assert len(texts) == len(rows)
    return [(len(t) % 7) / 6 for t in texts]


def test_fixed_prompts_are_a_seeded_subset_of_the_split(setup):
    cfg, tok = setup
    val = fixed_prompts(cfg, tok, "val", None, seed=0)
    first = fixed_prompts(cfg, tok, "val", 5, seed=0)
    assert len(first.rows) == 5 and all(r in val.rows for r in first.rows)
    assert first.rows == fixed_prompts(cfg, tok, "val", 5, seed=0).rows
    assert first.rows != fixed_prompts(cfg, tok, "val", 5, seed=1).rows
    train = fixed_prompts(cfg, tok, "train", 50, seed=0)
    assert not {r["question"] for r in train.rows} & {r["question"] for r in val.rows}
    for row, ids in zip(first.rows, first.ids):
        assert ids == tok(row["question"], add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="split"):
        fixed_prompts(cfg, tok, "test", 5, seed=0)


def test_mean_reward_equals_scoring_the_samples_by_hand(setup):
    cfg, tok = setup
    prompts = fixed_prompts(cfg, tok, "val", 5, seed=0)
    model = build_tiny_model()
    est = mean_reward(model, tok, prompts, length_reward, num_samples=3, max_new_tokens=6, temperature=1.0,
                      top_p=1.0, batch_size=2, seed=7)
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
    again = mean_reward(model, tok, prompts, length_reward, 3, 6, 1.0, 1.0, 2, seed=7)
    assert again.per_prompt == est.per_prompt                       # same seed, same samples


def test_cli_scores_each_checkpoint_on_the_same_prompts(tmp_path):
    out = tmp_path / "r.json"
    results = main(["--ckpt", "tiny", "--ckpt", "tiny", "--prompts", "4", "--samples", "2", "--out", str(out),
                    *OVERRIDES[1:]])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(results)) and len(saved) == 2
    assert saved[0]["per_prompt"] == saved[1]["per_prompt"]         # identical models, identical draws
    assert saved[0]["prompts"] == 4 and all(len(g) == 2 for g in saved[0]["per_prompt"])
    assert all(0.0 <= r <= 1.0 for g in saved[0]["per_prompt"] for r in g)


def test_cli_refuses_a_task_without_a_verifier():
    from ebft.config import ConfigError
    with pytest.raises(ConfigError, match="unstructured"):
        main(["--ckpt", "tiny", "task=unstructured_code", "model=tiny"])
