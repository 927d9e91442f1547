"""Warm start: ``init_from=<SFT run dir or HF dir>`` initialises the generator of any method; EBFT's
feature network stays the base model (``model.name``) unless ``feature_network.name`` names another."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft.data.sources import DATA_RECORD, check_data_record, data_record
from ebft.config import train_settings
from ebft.eval.runner import evaluate
from ebft.methods.ebft import EBFTModule
from ebft.methods.rlvr import RLVRModule
from ebft.models.loading import build_tiny_model
from tests.test_train import train
from tests.test_evaluate import make_settings as eval_settings
from tests.test_train import make_cfg

QUICK = ["eval.every_n_steps=0", "trainer.val_check_interval=1", "trainer.limit_val_batches=1"]
PARAM = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """Stage 1: a 2-step SFT run with a large lr, so its weights differ clearly from the base model."""
    run = tmp_path_factory.mktemp("sft")
    train(make_cfg(run, *QUICK, "method=sft", "trainer.max_steps=2", "method.lr=1e-2", "method.warmup_ratio=0"))
    return run


@pytest.fixture(scope="module")
def weights(sft_run):
    base = build_tiny_model()  # what model=tiny loads: seeded, so the same every time
    sft = AutoModelForCausalLM.from_pretrained(sft_run / "hf_model")
    assert not torch.equal(sft.state_dict()[PARAM], base.state_dict()[PARAM])
    return base, sft


def test_ebft_from_an_sft_run_starts_from_sft_and_keeps_the_base_feature_network(tmp_path, sft_run, weights, tokenizer):
    base, sft = weights
    cfg = make_cfg(tmp_path, *QUICK, "method=ebft", f"init_from={sft_run}", "trainer.max_steps=1")
    module = EBFTModule(train_settings(cfg), tokenizer)
    assert torch.equal(module.generator.state_dict()[PARAM], sft.state_dict()[PARAM])
    phi = module.feature_network.backbone.state_dict()
    assert phi and all(torch.equal(v, base.model.state_dict()[k]) for k, v in phi.items())
    # stage 2 trains from there
    summary = train(cfg)
    assert summary["steps"] == 1
    trained = AutoModelForCausalLM.from_pretrained(summary["hf_model"])
    assert not torch.equal(trained.state_dict()[PARAM], sft.state_dict()[PARAM])


def test_init_from_an_hf_dir_and_a_named_feature_network(tmp_path, sft_run, weights, tokenizer):
    _, sft = weights
    hf = sft_run / "hf_model"
    cfg = make_cfg(tmp_path, "method=ebft", f"init_from={hf}", f"feature_network.name={hf}")
    module = EBFTModule(train_settings(cfg), tokenizer)
    assert torch.equal(module.generator.state_dict()[PARAM], sft.state_dict()[PARAM])
    phi = module.feature_network.backbone.state_dict()
    assert all(torch.equal(v, sft.model.state_dict()[k]) for k, v in phi.items())


def test_rlvr_from_an_sft_run_uses_it_for_policy_and_kl_reference(tmp_path, sft_run, weights, tokenizer):
    _, sft = weights
    cfg = make_cfg(tmp_path, "method=rlvr", "task=translation", f"init_from={sft_run}", "method.kl_coef=0.05")
    module = RLVRModule(train_settings(cfg), tokenizer)
    for model in (module.generator, module.reference):
        assert torch.equal(model.state_dict()[PARAM], sft.state_dict()[PARAM])


def test_other_data_settings_than_the_checkpoint_were_trained_on_are_warned_about(tmp_path, sft_run):
    """The held-out rows come from this run's data settings: a warm start or an evaluation with other
    settings than the checkpoint's training is warned about, naming the settings that differ."""
    record = json.loads((sft_run / "hf_model" / DATA_RECORD).read_text())
    def data(*overrides):
        return train_settings(make_cfg(tmp_path, *overrides)).data

    assert record == data_record(data()) and record["data"]["limit"] == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_data_record(str(sft_run), data("method=ebft"), "init_from") == []
        assert check_data_record("tiny", data("data.limit=200"), "init_from") == []
    with pytest.warns(UserWarning, match=r"init_from=.* \(data.limit: 300 there, 200 here\).*held-out"):
        check_data_record(str(sft_run), data("data.limit=200"), "init_from")
    request = eval_settings(tmp_path / "eval", f"ckpt={sft_run}", "metrics=[ce]", "data.seed=7")
    with pytest.warns(UserWarning, match=r"ckpt=.* \(data.seed: 43 there, 7 here\)"):
        evaluate(request)
