"""The in-training calibration callback: leaves training untouched, logs the numbers evaluate.py
computes, picks the right feature network, and runs inside a real fit."""

import csv
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ebft.config import ConfigError, train_settings
from ebft.eval.calibration import chunk_nll, validation_ce
from ebft.eval.callback import CalibrationCallback, preserved_state
from ebft.eval.runner import calibrate, subset
from ebft.methods.ebft import EBFTModule
from ebft.methods.sft import SFTModule
from ebft.models.features import FeatureNetwork
from ebft.models.loading import load_tokenizer
from tests.test_train import train
from tests.test_train import make_cfg as train_cfg

SMALL = ["model=tiny", "data.limit=300", "data.val_size=40", "task.seq_len=32", "method.batch_size=2",
         "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "eval.cfm_chunks=3",
         "eval.cfm_train_chunks=2"]


def make_cfg(output_dir: Path, *overrides: str):
    return train_cfg(output_dir, *overrides, base=SMALL)


def make_settings(output_dir: Path, *overrides: str):
    return train_settings(make_cfg(output_dir, *overrides))


def module_and_trainer(settings, module_cls):
    tokenizer = load_tokenizer(settings.model.name)
    datamodule = module_cls.make_datamodule(settings, tokenizer)
    datamodule.setup("fit")
    module = module_cls(settings, tokenizer)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(datamodule=datamodule, loggers=[logger], global_step=3, callback_metrics={})
    return module, trainer, logged


def test_preserved_state_restores_every_rng_and_the_mode():
    model = torch.nn.Linear(2, 2).train()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with pytest.raises(RuntimeError):
        with preserved_state(model):
            model.eval()
            torch.rand(10), random.random(), np.random.rand(5)
            raise RuntimeError("evaluation failed half way")
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert model.training


@pytest.mark.parametrize("module_cls,downstream", [(SFTModule, ["eval.downstream_limit=1", "eval.num_samples=2",
                                                                  "eval.max_new_tokens=4"]), (EBFTModule, [])])
def test_callback_logs_what_evaluate_computes(tmp_path, module_cls, downstream):
    method = "sft" if module_cls is SFTModule else "ebft"
    settings = make_settings(tmp_path, f"method={method}", "eval.every_n_steps=3", *downstream)
    module, trainer, logged = module_and_trainer(settings, module_cls)
    callback = CalibrationCallback(settings)
    module.generator.train()
    state = torch.random.get_rng_state()
    metrics = callback.run(trainer, module)
    assert torch.equal(state, torch.random.get_rng_state()) and module.generator.training
    if module_cls is EBFTModule:
        assert callback.feature_network is module.feature_network
    else:
        assert isinstance(callback.feature_network, FeatureNetwork) and not hasattr(module, "feature_network")
    chunks = subset(trainer.datamodule.val_chunks, 3, settings.seed)
    task, calibration = settings.task, settings.eval.calibration
    expected, _, _ = calibrate(module.generator, callback.feature_network, chunks, task, calibration, ("cfm",),
                               progress=False)
    assert metrics["val/cfm"] == pytest.approx(expected["cfm"], abs=1e-6)
    assert metrics["val/cfm_whitened"] == pytest.approx(expected["cfm_whitened"], abs=1e-6)
    in_sample, _, _ = calibrate(module.generator, callback.feature_network, trainer.datamodule.first_trained(2), task,
                                calibration, ("cfm",), progress=False)
    assert metrics["train/cfm_fixed"] == pytest.approx(in_sample["cfm"], abs=1e-6)
    assert "val/cfm_change" not in metrics                       # the first evaluation is the reference
    assert logged == [(3, metrics)]
    assert ({"val/HumanEval/greedy", "val/HumanEval/pass@1"} <= set(metrics)) == bool(downstream)
    callback.on_train_batch_end(trainer, module, None, None, 0)   # already logged at this step
    trainer.global_step = 4
    callback.on_train_batch_end(trainer, module, None, None, 0)   # not a multiple of 3
    assert len(logged) == 1


def test_validation_step_logs_the_held_out_ce_evaluate_computes(tmp_path):
    settings = make_settings(tmp_path, "method=sft")
    module, trainer, _ = module_and_trainer(settings, SFTModule)
    chunks = trainer.datamodule.val_chunks
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: float(value)})
    with torch.no_grad():
        module.validation_step(vars(chunks), 0)
    expected = validation_ce(chunk_nll(module.generator, chunks.input_ids, chunks.answer_mask, progress=False))
    assert 0 < expected["ce_answer"] != expected["ce"]
    assert logged == pytest.approx({"val/ce": expected["ce"], "val/ce_answer": expected["ce_answer"]}, rel=1e-5)


def test_first_trained_chunks_are_the_first_batches_of_the_run(tmp_path):
    settings = make_settings(tmp_path, "method=sft")
    datamodule = SFTModule.make_datamodule(settings, load_tokenizer(settings.model.name))
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    first = torch.cat([next(batches)["input_ids"] for _ in range(3)])
    assert torch.equal(datamodule.first_trained(5).input_ids, first[:5])
    assert torch.equal(datamodule.first_trained(6).input_ids, first)


def test_change_since_the_first_evaluation_is_paired(tmp_path):
    """After a weight change the callback reports the paired change of each set's CFM, equal to the
    difference of per-context values on the same contexts and random numbers."""
    settings = make_settings(tmp_path, "method=sft", "eval.every_n_steps=1")
    module, trainer, _ = module_and_trainer(settings, SFTModule)
    callback = CalibrationCallback(settings)
    before = callback.run(trainer, module)
    with torch.no_grad():
        for p in module.generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = callback.run(trainer, module)
    for name in ("val/cfm", "train/cfm_fixed"):
        assert after[f"{name}_change"] == pytest.approx(after[name] - before[name], abs=1e-6)
        assert 0 < after[f"{name}_change_se"] < 1
    restored = CalibrationCallback(settings)
    restored.load_state_dict(callback.state_dict())          # a resumed run keeps the same reference
    assert restored.initial.keys() == {"val/cfm", "train/cfm_fixed"}


def test_schedule_must_be_whole_steps(tmp_path):
    assert make_settings(tmp_path, "eval.every_n_steps=0").in_training.every_n_steps == 0
    with pytest.raises(ConfigError, match="eval.every_n_steps=0.5"):
        make_settings(tmp_path, "eval.every_n_steps=0.5")


def test_cfm_is_logged_during_sft_training(tmp_path):
    train(make_cfg(tmp_path, "method=sft", "trainer.max_steps=2", "eval.every_n_steps=1",
                   "trainer.val_check_interval=2"))
    with open(tmp_path / "metrics.csv") as f:
        steps = sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("val/cfm"))
    assert steps == [0, 1, 2]
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/cfm_fixed")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2] and rows[0]["train/cfm_fixed_change"] == ""
    assert rows[2]["val/cfm_change"] != "" and rows[2]["train/cfm_fixed_change_se"] != ""


def test_callback_switches_itself_off_under_fsdp(tmp_path, caplog):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    callback = CalibrationCallback(make_settings(tmp_path, "eval.every_n_steps=2"))
    calls = []
    callback.run = lambda trainer, module: calls.append(trainer.global_step)
    callback.on_train_start(SimpleNamespace(strategy=DDPStrategy(), global_step=0), None)
    assert calls == [0] and callback.every == 2
    with caplog.at_level("WARNING"):
        callback.on_train_start(SimpleNamespace(strategy=FSDPStrategy(), global_step=0), None)
    assert calls == [0] and callback.every == 0 and "trainer=fsdp" in caplog.text
    callback.on_train_batch_end(SimpleNamespace(global_step=2), None, None, None, 0)
    assert calls == [0]
