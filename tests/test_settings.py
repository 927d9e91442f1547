"""Typed settings at the boundary: only the entry layer sees the Hydra config; one feature-network
spec serves training and evaluation; renamed keys are refused with the new name."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ebft.config import ConfigError, FeatureNetworkSettings, check_renamed, train_settings
from ebft.eval.callback import CalibrationCallback
from ebft.methods.ebft import EBFTModule
from ebft.methods.sft import SFTModule

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"ebft/config.py"}
"""The one module of the package that may hold the composed config: the conversion into settings
(the entry points ``train.py`` and ``evaluate.py`` are outside the package)."""


def config_uses(path: Path) -> list[str]:
    """Where a module imports omegaconf's ``DictConfig`` or annotates a parameter with it."""
    tree, found = ast.parse(path.read_text()), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("omegaconf"):
            found += [f"line {node.lineno}: imports DictConfig" for a in node.names if a.name == "DictConfig"]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None and "DictConfig" in ast.unparse(arg.annotation):
                    found.append(f"line {node.lineno}: {node.name}({arg.arg}: {ast.unparse(arg.annotation)})")
    return found


def test_no_module_below_the_entry_layer_takes_the_config():
    modules = sorted(p for p in (ROOT / "ebft").rglob("*.py") if str(p.relative_to(ROOT)) not in ENTRY)
    assert len(modules) > 20
    offenders = {str(p.relative_to(ROOT)): uses for p in modules if (uses := config_uses(p))}
    assert offenders == {}, f"modules below the entry layer that take the DictConfig: {offenders}"


def test_the_check_sees_an_annotated_parameter(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from omegaconf import DictConfig\n\ndef f(x, cfg: 'DictConfig | None' = None):\n    pass\n")
    assert config_uses(module) == ["line 1: imports DictConfig", "line 3: f(cfg: 'DictConfig | None')"]


def make_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", "data.limit=300", "data.val_size=40",
                                                      "task.seq_len=32", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


def test_one_feature_network_for_training_and_for_val_cfm(tmp_path, tokenizer):
    """EBFT's rewards and the val/cfm of an SFT run read the same spec (``feature_network``)."""
    spec = ["feature_network.layers=[0.5,1.0]", "feature_network.pooling=mean", "feature_network.normalisation=per_layer"]
    ebft = train_settings(make_cfg(tmp_path, "method=ebft", *spec))
    sft = train_settings(make_cfg(tmp_path, "method=sft", *spec))
    assert ebft.feature_network == sft.feature_network == FeatureNetworkSettings(None, (0.5, 1.0), "mean", "per_layer")
    module = EBFTModule(ebft, tokenizer)
    datamodule = SFTModule.make_datamodule(sft, tokenizer)
    datamodule.setup("fit")
    callback = CalibrationCallback(sft)
    callback._setup(type("Trainer", (), {"datamodule": datamodule})(), SFTModule(sft, tokenizer))
    for phi in (module.feature_network, callback.feature_network):
        assert (phi.taps, phi.pooling, phi.normalisation) == ((2, 4), "mean", "per_layer")


@pytest.mark.parametrize("override,new", [("method.features.layers=[1.0]", "feature_network.layers"),
                                          ("model.feature_network=/some/model", "feature_network.name"),
                                          ("n_samples=4", "num_samples"), ("eval.n_samples=2", "eval.num_samples"),
                                          ("eval.cfm_samples=8", "eval.cfm_num_samples"),
                                          ("eval.reward.samples=2", "eval.reward.num_samples"),
                                          ("model.lora.alpha=32", "model.lora.lora_alpha")])
def test_renamed_keys_name_the_new_one(override, new):
    with pytest.raises(ConfigError, match=f"use {new}="):
        check_renamed([override])
    check_renamed(["feature_network.layers=[1.0]", "model.name=tiny", "num_samples=4", "eval.cfm_num_samples=8",
                   "model.lora.lora_alpha=32", "alpha=0.5"])


def test_train_py_refuses_a_renamed_key_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "model=tiny", "method.features.layers=[1.0]",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("train.py: method.features.layers was renamed")


def test_one_held_out_split_for_training_evaluation_and_rlvr(tmp_path, tokenizer):
    """The chunk data, RLVR's prompt data and evaluate.py's held-out data come from one split."""
    from ebft.data.datamodule import ChunkDataModule, PromptDataModule
    from ebft.data.sources import split_key
    from ebft.eval.runner import held_out

    settings = train_settings(make_cfg(tmp_path, "method=rlvr", "task=translation", "method.check_references=false"))
    chunks = ChunkDataModule(settings.data, tokenizer, 32, 2, settings.seed)
    prompts = PromptDataModule(settings.data, tokenizer, 32, 2, settings.seed, settings.method.prompts)
    chunks.setup(), prompts.setup()
    held = held_out(settings.data, tokenizer, 32)
    assert chunks.val_rows == prompts.val_rows == held.rows and len(held.rows) >= 40
    assert torch.equal(chunks.val_chunks.input_ids, held.chunks.input_ids)
    assert torch.equal(prompts.val_chunks.input_ids, held.chunks.input_ids)
    assert not {split_key(r) for r in held.rows} & {split_key(r) for r in prompts.prompts.rows}
    assert len(prompts.prompts) > 100
