"""RLVR (GRPO): cached sampling and log-probs on padded prompts, the loss, prompt data, a learning
test on a tiny random model and two training steps end to end."""

import logging
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from ebft.app import run as run_module
from ebft.config import ConfigError, train_settings
from ebft.data.prompts import left_pad_collate, select_prompts, with_module_namespace
from ebft.methods import rlvr
from ebft.methods.rlvr import RLVRModule, completion_logprobs, zero_signal_fraction
from ebft.models.loading import build_tiny_model
from ebft.objectives.baselines import group_normalized_advantages
from ebft.objectives.losses import grpo_loss, k3_kl
from ebft.objectives.verifiable import code_rewards
from ebft.rollout.completions import sample_completions
from tests.test_train import train
from tests.test_train import SMALL, train_losses

CONF = Path(__file__).resolve().parents[1] / "conf"
MBPP_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
EOS, PAD = 2, 0


def rlvr_settings(*overrides: str):
    """The typed settings of ``python train.py model=tiny method=rlvr overrides...``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", "method=rlvr", *overrides])
    with open_dict(cfg):
        cfg.output_dir = "unused"
    return train_settings(cfg)


def padded_prompts(*prompts: list[int]):
    return left_pad_collate(PAD)([{"prompt_ids": p, "row": {}} for p in prompts])


# ---------------------------------------------------------------- rollout and log-probs

def test_left_pad_collate():
    batch = left_pad_collate(PAD)([{"prompt_ids": [5, 6], "row": {"a": 1}}, {"prompt_ids": [7, 8, 9], "row": {}}])
    assert batch["prompt_ids"].tolist() == [[PAD, 5, 6], [7, 8, 9]]
    assert batch["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch["rows"] == [{"a": 1}, {}]


def test_cached_sampling_of_padded_prompts_equals_full_forwards(tiny_model):
    batch = padded_prompts([11, 12, 13], [21, 22, 23, 24, 25, 26])
    greedy = sample_completions(tiny_model, batch["prompt_ids"], batch["prompt_mask"], 2, 10, eos_id=-1,
                                pad_id=PAD, temperature=1e-6)
    assert greedy.tokens.shape == (4, 10) and greedy.mask.all() and not greedy.finished.any()
    assert torch.equal(greedy.tokens[0], greedy.tokens[1])  # sample-major: rows 0, 1 = prompt 0
    for row, prompt in ((0, [11, 12, 13]), (2, [21, 22, 23, 24, 25, 26])):
        full = torch.tensor([prompt + greedy.tokens[row].tolist()])
        with torch.no_grad():
            logits = tiny_model(full).logits[0, len(prompt) - 1:-1]
        assert torch.equal(logits.argmax(-1), greedy.tokens[row])
        # the recomputed log-probs (padded batch) are those of the unpadded sequence
        expected = logits.log_softmax(-1).gather(-1, greedy.tokens[row][:, None]).squeeze(-1)
        rows = (batch["prompt_ids"].repeat_interleave(2, 0), batch["prompt_mask"].repeat_interleave(2, 0))
        got = completion_logprobs(tiny_model, *rows, greedy.tokens)[row]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)



def test_sampler_logprobs_are_those_of_the_training_forward(tiny_model):
    batch = padded_prompts([11, 12, 13], [21, 22, 23, 24, 25])
    rollout = sample_completions(tiny_model, batch["prompt_ids"], batch["prompt_mask"], 3, 8, EOS, PAD,
                                 temperature=0.7, generator=torch.Generator().manual_seed(0))
    rows = (batch["prompt_ids"].repeat_interleave(3, 0), batch["prompt_mask"].repeat_interleave(3, 0))
    recomputed = completion_logprobs(tiny_model, *rows, rollout.tokens, temperature=0.7)
    torch.testing.assert_close(rollout.logprobs, recomputed * rollout.mask, atol=1e-5, rtol=1e-5)


def test_completions_stop_at_eos_and_count_it(tiny_model):
    batch = padded_prompts([11, 12, 13], [21, 22, 23, 24])
    free = sample_completions(tiny_model, batch["prompt_ids"], batch["prompt_mask"], 1, 8, -1, PAD, 1e-6)
    eos = int(free.tokens[0, 2])
    first = free.tokens[0].tolist().index(eos)
    stopped = sample_completions(tiny_model, batch["prompt_ids"], batch["prompt_mask"], 1, 8, eos, PAD, 1e-6)
    assert bool(stopped.finished[0]) and int(stopped.lengths[0]) == first + 1
    assert stopped.mask[0].tolist() == [True] * (first + 1) + [False] * (stopped.tokens.shape[1] - first - 1)
    assert torch.equal(stopped.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert (stopped.tokens[0, first + 1:] == PAD).all()


def test_sampling_is_reproducible_with_a_seeded_generator(tiny_model):
    batch = padded_prompts([11, 12, 13], [21, 22])
    draw = [sample_completions(tiny_model, batch["prompt_ids"], batch["prompt_mask"], 4, 6, EOS, PAD,
                               generator=torch.Generator().manual_seed(s)).tokens for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


# ---------------------------------------------------------------- loss

def test_grpo_loss_hand_case():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0])
    loss, pg, kl = grpo_loss(logprobs, logprobs.detach(), advantages, mask)
    assert loss.item() == pytest.approx(-1 / 3) and kl.item() == 0  # -(1 + 1 - 1) / 3 counted tokens
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_k3_kl_estimator():
    lp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    expected = [0.0, math.e - 1 - 1, math.exp(-1) + 1 - 1]
    torch.testing.assert_close(k3_kl(lp, ref), torch.tensor(expected))
    # unbiased: E_{y~p}[k3] = KL(p || q) over a full distribution
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    assert float((p * k3_kl(p.log(), q.log())).sum()) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    lp, ref, mask = lp[None], ref[None], torch.tensor([[True, True, False]])  # one completion of 3 tokens
    loss, pg, kl = grpo_loss(lp, lp, torch.zeros(1), mask, kl_coef=0.5, ref_logprobs=ref)
    assert kl.item() == pytest.approx((math.e - 2) / 2) and loss.item() == pytest.approx(0.5 * kl.item())
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(lp, lp, torch.zeros(1), mask, kl_coef=0.5)


def test_zero_signal_fraction():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.2]])
    assert zero_signal_fraction(rewards).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- config and module

@pytest.mark.parametrize("override,fragment", [
    ("method.ppo_epochs=2", "method.ppo_epochs=2"), ("method.kl_coef=-1", "method.kl_coef=-1"),
    ("method.clip_eps=1.5", "method.clip_eps=1.5"), ("method.max_prompt_tokens=0", "max_prompt_tokens=0"),
])
def test_bad_rlvr_settings_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        rlvr_settings("task=translation", override)


def test_kl_reference_is_loaded_only_when_needed_and_frozen(tokenizer):
    assert RLVRModule(rlvr_settings("task=translation"), tokenizer).reference is None
    module = RLVRModule(rlvr_settings("task=translation", "method.kl_coef=0.1", "method.max_new_tokens=4",
                                 "method.num_samples=2"), tokenizer)
    assert not any(p.requires_grad for p in module.reference.parameters())
    batch = padded_prompts([11, 12, 13], [21, 22])
    rollout = module.rollout(batch, 0)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, parts = module.policy_loss(batch, rollout, rewards)
    assert parts.kl.item() == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    opt = torch.optim.SGD(module.generator.parameters(), lr=1.0)
    loss, _ = module.policy_loss(batch, rollout, rewards)
    loss.backward()
    opt.step()
    _, parts = module.policy_loss(batch, rollout, rewards)
    assert parts.kl.item() > 1e-6


def test_update_scores_only_completions_with_a_signal_and_gives_the_full_gradient(tokenizer):
    module = RLVRModule(rlvr_settings("task=translation", "method.max_new_tokens=5", "method.num_samples=4"), tokenizer)
    batch = padded_prompts([11, 12, 13], [21, 22])
    rollout = module.rollout(batch, 0)
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.5]])  # the first group has no signal
    params = [p for p in module.generator.parameters() if p.requires_grad]

    def gradients(loss):
        return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    loss, parts = module.policy_loss(batch, rollout, rewards)
    assert parts.scored_fraction.item() == 0.5
    rows = (batch["prompt_ids"].repeat_interleave(4, 0), batch["prompt_mask"].repeat_interleave(4, 0))
    logprobs = completion_logprobs(module.generator, *rows, rollout.tokens)
    advantages = group_normalized_advantages(rewards).reshape(-1)
    full, _, _ = grpo_loss(logprobs, logprobs.detach(), advantages, rollout.mask)
    torch.testing.assert_close(loss, full)
    for got, expected in zip(gradients(loss), gradients(full)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)

    loss, parts = module.policy_loss(batch, rollout, torch.ones(2, 4))  # no signal at all: one row, zero gradient
    assert parts.scored_fraction.item() == 1 / 8 and loss.item() == 0
    assert all(not g.any() for g in gradients(loss))


def test_rlvr_raises_the_reward_it_is_given(tokenizer):
    """A real learning test: reward = fraction of completion tokens equal to token 7 (1/256 by chance)."""
    module = RLVRModule(rlvr_settings("task=translation", "method.max_new_tokens=8", "method.num_samples=8"), tokenizer)
    module.generator = build_tiny_model(vocab_size=256, seed=0)
    torch.manual_seed(0)
    prompts = torch.randint(3, 256, (4, 6))
    batch = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts)}

    def reward(rollout):
        hits = ((rollout.tokens == 7) & rollout.mask).sum(-1)
        return (hits / rollout.lengths.clamp_min(1)).view(4, 8)

    def mean_reward() -> float:
        return sum(float(reward(module.rollout(batch, 1000 + i)).mean()) for i in range(4)) / 4

    before = mean_reward()
    opt = torch.optim.AdamW(module.generator.parameters(), lr=1e-2)
    for step in range(10):
        rollout = module.rollout(batch, step)
        loss, _ = module.policy_loss(batch, rollout, reward(rollout))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_reward()
    assert before < 0.02 and after > before + 0.1


# ---------------------------------------------------------------- prompt data

def test_stdlib_doctest_rows_get_their_module_namespace_but_not_the_function():
    question = 'def join(a, *p):\n    """\n    >>> join("a", "b")\n    \'a/b\'\n    """\n'
    row = {"question": question, "answer": "    return a + _get_sep(a) + p[0]\n", "tests": question.split('"""')[1],
           "test_type": "doctest", "module": "posixpath", "entry_point": "join"}
    composed = with_module_namespace(row)
    assert "test_setup" not in row and "posixpath" in composed["test_setup"]
    right, wrong = row["answer"], "    return a\n"
    # the body needs posixpath's private _get_sep; posixpath.join itself must not replace the body
    assert code_rewards([right, wrong, right], [composed, composed, row]) == [1.0, 0.0, 0.0]
    assert with_module_namespace({"question": "q", "answer": "a"}) == {"question": "q", "answer": "a"}


def test_prompt_selection_drops_and_counts(tokenizer, caplog):
    def row(q, a="Hallo Welt", lang="de"):
        return {"question": f"Translate this from English to German:\nEnglish: {q}\nGerman:", "answer": " " + a,
                "target_lang": lang}

    rows = [row("Hello world"), row("No language", lang=""), row("Empty", a=" "), row("long " * 60),
            row("Good morning", "Guten Morgen")]
    with caplog.at_level(logging.INFO, logger="ebft.data.prompts"):
        kept, ids = select_prompts(rows, "translation", tokenizer, max_prompt_tokens=40, check_references=True)
    assert [r["answer"] for r in kept] == [" Hallo Welt", " Guten Morgen"]
    assert ids[0] == tokenizer(rows[0]["question"], add_special_tokens=False)["input_ids"]
    assert "2 of 5 training rows" in caplog.text and "2 without a verifier" in caplog.text
    assert "1 empty or longer than 40 tokens" in caplog.text


def test_prompt_selection_drops_code_rows_without_tests_or_with_a_failing_reference(tokenizer):
    tests = ["assert add(1, 2) == 3"]
    rows = [{"question": "Add two numbers.", "answer": "def add(a, b):\n    return a + b\n", "tests": tests},
            {"question": "Add, no tests.", "answer": "def add(a, b):\n    return a + b\n"},
            {"question": "Broken reference.", "answer": "def add(a, b):\n    return a - b\n", "tests": tests},
            {"question": "Trivial tests.", "answer": "def f():\n    pass\n", "tests": ["assert True"]}]
    kept, _ = select_prompts(rows, "qa_code", tokenizer, 1024, check_references=True)
    assert [r["question"] for r in kept] == ["Add two numbers."]
    kept, _ = select_prompts(rows, "qa_code", tokenizer, 1024, check_references=False)
    assert len(kept) == 3


# ---------------------------------------------------------------- end to end

RLVR_SMALL = [*SMALL, "eval.every_n_steps=0", "method=rlvr", "method.max_new_tokens=6", "method.num_samples=4",
              "method.lr=1e-3", "trainer.max_steps=2"]


class GeneratorMode(Callback):
    """Records whether the generator is in train mode (gradient checkpointing needs it) at each step."""

    def __init__(self):
        self.training = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.training.append(pl_module.generator.training)


def test_rlvr_trains_end_to_end_on_translation(tmp_path, monkeypatch):
    from tests.test_train import make_cfg

    mode, original = GeneratorMode(), run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer", lambda settings, out, cbs: original(settings, out, [*cbs, mode]))
    summary = train(make_cfg(tmp_path, *RLVR_SMALL, "task=translation"))
    assert summary["steps"] == 2 and Path(summary["hf_model"], "config.json").is_file()
    assert mode.training == [True, True]
    assert len(summary["val_ce"]) >= 2
    for key in ("train/reward", "train/zero_signal_fraction", "train/completion_len", "perf/rollout_tokens_per_s"):
        assert sorted(train_losses(tmp_path, key)) == [0, 1], key
    assert all(0 < v <= 6 for v in train_losses(tmp_path, "train/completion_len").values())


@pytest.mark.slow
def test_rlvr_trains_end_to_end_on_mbpp_code(tmp_path):
    if not MBPP_FILE.is_file():
        pytest.skip(f"MBPP data file {MBPP_FILE} not present")
    from tests.test_train import make_cfg

    summary = train(make_cfg(tmp_path, *RLVR_SMALL, "task=qa_code", f"data.mbpp_path={MBPP_FILE}", "data.limit=200"))
    assert summary["steps"] == 2
    assert all(v == 0.0 for v in train_losses(tmp_path, "train/reward").values())  # random weights write no code
    assert all(v == 1.0 for v in train_losses(tmp_path, "train/zero_signal_fraction").values())


def test_rlvr_resume_gives_the_same_next_steps(tmp_path, monkeypatch):
    from tests.test_train import Crash, CrashAt, make_cfg

    # a dense reward, so that the policy moves and a wrong restore would show in the next steps
    monkeypatch.setattr(rlvr, "reward_fn_for", lambda task: lambda texts, rows: [t.count("e") / (1 + len(t))
                                                                                 for t in texts])
    extra = [*RLVR_SMALL, "task=translation", "trainer.max_steps=4"]
    train(make_cfg(tmp_path / "full", *extra))
    original = run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer", lambda settings, out, cbs: original(settings, out, [*cbs, CrashAt(2)]))
    with pytest.raises(Crash):
        train(make_cfg(tmp_path / "crashed", *extra))
    monkeypatch.setattr(run_module, "build_trainer", original)
    train(make_cfg(tmp_path / "resumed", *extra, f"ckpt_path={tmp_path / 'crashed'}"))
    assert len(set(train_losses(tmp_path / "full", "train/logprob").values())) == 4
    for key in ("train/loss", "train/reward", "train/logprob"):
        expected, got = train_losses(tmp_path / "full", key), train_losses(tmp_path / "resumed", key)
        assert sorted(got) == [2, 3]
        for step in (2, 3):
            assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
