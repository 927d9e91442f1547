"""End to end on a tiny random model: training runs, saves an HF model, resumes exactly."""

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from ebft.app import run as run_module
from ebft.config import TrainSettings, train_settings

CONF = Path(__file__).resolve().parents[1] / "conf"

SMALL = ["model=tiny", "data.limit=300", "data.val_size=40", "task.seq_len=32", "method.batch_size=2",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
         "eval.every_n_steps=0"]


def make_cfg(output_dir: Path, *overrides: str, base: list[str] = SMALL):
    """``conf/train.yaml`` with ``base`` then ``overrides``, writing to ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*base, *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def validate(cfg) -> TrainSettings:
    """What ``train.py`` checks before training: the composed config's settings, and their file checks."""
    settings = train_settings(cfg)
    run_module.validate(settings)
    return settings


def train(cfg) -> dict:
    """``train.py`` without Hydra's runtime: the composed config's settings, trained."""
    return run_module.train(train_settings(cfg))


def train_losses(output_dir: Path, key: str) -> dict[int, float]:
    with open(output_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


class Crash(RuntimeError):
    pass


class CrashAt(Callback):
    """Simulates a crash right after optimizer step ``step`` (and its checkpoint) completed."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Crash


def crash_then_resume(tmp_path: Path, monkeypatch, extra: list[str], step: int) -> tuple[Path, Path]:
    """A run crashed after ``step`` optimizer steps (``crashed/``) and its resumption (``resumed/``)."""
    crashed = tmp_path / "crashed"
    original = run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer",
                        lambda settings, out, cbs: original(settings, out, [*cbs, CrashAt(step)]))
    with pytest.raises(Crash):
        train(make_cfg(crashed, *extra))
    monkeypatch.setattr(run_module, "build_trainer", original)
    resumed = tmp_path / "resumed"
    train(make_cfg(resumed, *extra, f"ckpt_path={crashed}"))
    return crashed, resumed


def test_sft_trains_and_saves_hf_model(tmp_path):
    summary = train(make_cfg(tmp_path, "method=sft", "trainer.max_steps=2"))
    assert summary["steps"] == 2
    hf = Path(summary["hf_model"])
    assert (hf / "config.json").is_file() and (hf / "tokenizer_config.json").is_file()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.num_hidden_layers == 4
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert len(summary["val_ce"]) >= 2  # before training and after
    assert 0 in train_losses(tmp_path, "val/ce")                    # the initial validation survives fit
    batch_s = train_losses(tmp_path, "perf/batch_s")
    assert sorted(batch_s) == [0, 1] and all(v > 0 for v in batch_s.values())
    assert summary["seconds_per_step"] == pytest.approx(sum(batch_s.values()) / 2, rel=1e-3)
    assert summary["seconds_per_step"] * 2 < summary["seconds"]


@pytest.mark.parametrize("method,key", [("sft", "train/ce"), ("ebft", "train/loss")])
def test_resume_gives_the_same_next_steps(tmp_path, monkeypatch, method, key):
    extra = [f"method={method}", "trainer.max_steps=4", "method.lr=1e-3", "method.schedule=cosine",
             "method.warmup_ratio=0.3"]
    full = tmp_path / "full"
    train(make_cfg(full, *extra))

    crashed, resumed = crash_then_resume(tmp_path, monkeypatch, extra, step=2)

    expected, got = train_losses(full, key), train_losses(resumed, key)
    assert sorted(got) == [2, 3]
    for step in (2, 3):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    # and the interrupted run really stopped after 2 steps
    assert max(train_losses(crashed, key)) == 1


@pytest.mark.slow
def test_epoch_bounded_resume_with_accumulation_trains_the_uninterrupted_steps(tmp_path, monkeypatch):
    """Two epochs of 10 micro-batches (40 chunks), 3 per optimizer step (steps of 3, 3, 3 and 1 batches):
    a run interrupted mid-epoch and resumed logs the same per-step losses as the uninterrupted one."""
    extra = ["method=sft", "task=translation", "data.limit=40", "data.val_size=4", "method.batch_size=4",
             "global_batch=12", "trainer.max_epochs=2", "trainer.max_steps=-1", "trainer.limit_val_batches=0",
             "method.lr=1e-3"]
    full = tmp_path / "full"
    summary = train(make_cfg(full, *extra))
    expected = train_losses(full, "train/ce")
    assert summary["steps"] == 8 and sorted(expected) == list(range(8))

    crashed, resumed = crash_then_resume(tmp_path, monkeypatch, extra, step=6)
    got = train_losses(resumed, "train/ce")
    assert sorted(got) == [6, 7]
    for step in (6, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
