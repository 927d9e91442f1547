"""LoRA (``model.lora``) on the tiny random model with the real ``peft`` library: the EBFT feature network
is the generator's own base with its adapters disabled (equal to a separately loaded frozen copy), only
the adapters train, checkpoints resume exactly, the run's adapter and merged model load, warm starts
from a LoRA run, RLVR's KL reference, and bad settings refused."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ebft.app import run as run_module
from ebft.config import ConfigError
from ebft.methods.ebft import EBFTModule
from ebft.methods.rlvr import RLVRModule, completion_logprobs
from ebft.core.compat import decoder_layers
from ebft.models.features import FeatureNetwork
from ebft.models.loading import build_tiny_model
from ebft.models.lora import adapters_disabled
from ebft.app.trainer import build_trainer
from tests.test_train import train, validate
from tests.test_train import Crash, CrashAt, make_cfg, train_losses

LORA = ["model.lora.rank=4", "method.lr=1e-2", "method.warmup_ratio=0", "trainer.limit_val_batches=0"]


def strided_row(layout, seed=0):
    """A strided row (1, length) of random chunk and sample tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (1, layout.seq_len), generator=g)
    tokens = torch.randint(0, 1000, (1, layout.num_samples, layout.num_blocks, layout.gen_len), generator=g)
    return layout.scatter_generated(ids, tokens)


def frozen_copy(spec) -> FeatureNetwork:
    """A feature network from a separate load of the base model, as without LoRA."""
    return FeatureNetwork.from_name("tiny", dtype=torch.float32, layers=spec.layers, pooling=spec.pooling,
                                    normalisation=spec.normalisation)


def test_adapter_disabled_features_equal_a_frozen_copy_and_only_adapters_train(tmp_path, tokenizer):
    cfg = make_cfg(tmp_path, "method=ebft", "trainer.max_steps=2", "method.gradient_checkpointing=true", *LORA)
    settings = validate(cfg)
    datamodule = EBFTModule.make_datamodule(settings, tokenizer)
    datamodule.setup("fit")
    module = EBFTModule(settings, tokenizer)
    # no second copy: the feature network has no weights of its own and runs the generator's layers
    assert list(module.feature_network.parameters()) == []
    assert decoder_layers(module.feature_network.backbone)[0] is decoder_layers(module.generator)[0]
    assert len(decoder_layers(module.feature_network.backbone)) == max(module.feature_network.taps) == 3

    copy, row = frozen_copy(settings.feature_network), strided_row(module.layout)
    base = {k: v.clone() for k, v in module.generator.state_dict().items() if ".lora_" not in k}
    for got, want in zip(module.feature_network.strided_features(row, module.layout),
                         copy.strided_features(row, module.layout)):
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)

    trainer = build_trainer(settings, tmp_path, [])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2

    optimizer = trainer.optimizers[0]
    adapters = [p for n, p in module.named_parameters() if ".lora_" in n]
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in adapters}
    assert len(optimizer.state) == len(adapters) == 4 * 7 * 2  # layers x projections x (A, B)
    assert all(not p.requires_grad for n, p in module.named_parameters() if ".lora_" not in n)
    lora_b = [p for n, p in module.named_parameters() if ".lora_B." in n]
    assert all(p.abs().max() > 0 for p in lora_b)            # the adapters trained (B starts at 0)
    after = {k: v for k, v in module.generator.state_dict().items() if ".lora_" not in k}
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)

    for got, want in zip(module.feature_network.strided_features(row, module.layout),
                         copy.strided_features(row, module.layout)):
        assert torch.equal(got, want)
    # ... while the generator itself (adapters on) now gives other features
    trained = FeatureNetwork(module.generator, layers=settings.feature_network.layers)
    assert not torch.allclose(trained.strided_features(row, module.layout)[1],
                              copy.strided_features(row, module.layout)[1], atol=1e-4)
    assert module.generator.training                        # the feature pass restored the train mode


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """EBFT with LoRA: an uninterrupted 3-step run, and one that crashes after step 2 and is resumed."""
    root = tmp_path_factory.mktemp("lora")
    extra = ["method=ebft", "trainer.max_steps=3", "method.schedule=cosine", *LORA]
    train(make_cfg(root / "full", *extra))
    original = run_module.build_trainer
    run_module.build_trainer = lambda settings, out, cbs: original(settings, out, [*cbs, CrashAt(2)])
    try:
        with pytest.raises(Crash):
            train(make_cfg(root / "crashed", *extra))
    finally:
        run_module.build_trainer = original
    train(make_cfg(root / "resumed", *extra, f"ckpt_path={root / 'crashed'}"))
    return root


def test_lora_checkpoints_hold_adapters_and_resume_exactly(lora_runs):
    ckpt = torch.load(lora_runs / "crashed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"][0]["state"]) == len(ckpt["state_dict"])
    expected, got = train_losses(lora_runs / "full", "train/loss"), train_losses(lora_runs / "resumed", "train/loss")
    assert sorted(got) == [2]
    assert got[2] == pytest.approx(expected[2], rel=1e-6, abs=1e-7)
    full = load_file(lora_runs / "full" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(lora_runs / "resumed" / "adapter" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7)


def test_lora_run_writes_a_peft_adapter_and_the_merged_model(lora_runs, tokenizer):
    run = lora_runs / "full"
    merged = AutoModelForCausalLM.from_pretrained(run / "hf_model").eval()
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    with_adapter = PeftModel.from_pretrained(build_tiny_model(vocab_size=len(tokenizer)), run / "adapter").eval()
    base = build_tiny_model(vocab_size=len(tokenizer)).eval()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        want, got, plain = with_adapter(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3                 # the merged model is not the base model


def test_init_from_a_lora_run_continues_its_adapter_over_the_base(lora_runs, tmp_path, tokenizer):
    run = lora_runs / "full"
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    module = EBFTModule(validate(make_cfg(tmp_path, "method=ebft", f"init_from={run}", *LORA)), tokenizer)
    own = {k: v for k, v in module.generator.state_dict().items() if ".lora_" in k}
    assert len(own) == len(saved)
    for k, v in own.items():   # peft names the saved weights without the adapter name
        assert torch.equal(v, saved["base_model.model." + k.replace(".default", "")])
    base = build_tiny_model(vocab_size=len(tokenizer)).state_dict()
    assert all(torch.equal(v, base[k.replace(".base_layer", "")]) for k, v in module.generator.state_dict().items()
               if ".lora_" not in k)
    assert list(module.feature_network.parameters()) == []      # the feature network is still the base, with no copy

    with pytest.raises(ConfigError, match=r"model.lora.rank=8 but the adapter has 4"):
        validate(make_cfg(tmp_path, "method=ebft", f"init_from={run}", *LORA, "model.lora.rank=8"))
    # a warm-started RLVR's KL reference is its initial policy: the run's merged model, loaded
    rlvr = RLVRModule(validate(make_cfg(tmp_path, "method=rlvr", "task=translation", f"init_from={run}",
                                        "method.kl_coef=0.05", *LORA)), tokenizer)
    merged = load_file(run / "hf_model" / "model.safetensors")
    assert all(torch.equal(v, merged[k]) for k, v in rlvr.reference.state_dict().items() if k in merged)


def test_rlvr_kl_reference_is_the_base_with_adapters_disabled(tmp_path, tokenizer):
    module = RLVRModule(validate(make_cfg(tmp_path, "method=rlvr", "task=translation", "method.kl_coef=0.05", *LORA)),
                        tokenizer)
    assert module.reference is None                       # no second copy
    with torch.no_grad():
        for name, p in module.generator.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)                        # adapters that change the policy
    module.generator.train()
    ids, mask = torch.randint(0, 1000, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    completions = torch.randint(0, 1000, (2, 5))
    with adapters_disabled(module.adapters):
        reference = completion_logprobs(module.generator, ids, mask, completions)
    base = build_tiny_model(vocab_size=len(tokenizer)).eval()
    with torch.no_grad():
        assert torch.equal(reference, completion_logprobs(base, ids, mask, completions))
        policy = completion_logprobs(module.generator, ids, mask, completions)
    assert (policy - reference).abs().max() > 1e-3
    assert module.generator.training


@pytest.mark.parametrize("override,message", [
    ("model.lora.rank=0", r"model.lora.rank=0 must be a whole number >= 1"),
    ("model.lora.dropout=1.5", r"model.lora.dropout=1.5 must be in \[0, 1\)"),
    ("trainer=fsdp", r"model.lora with trainer=fsdp is not supported"),
    ("trainer.strategy=fsdp", r"model.lora with trainer=fsdp is not supported"),
    ("model.lora.target_modules=[q_proj,qkv]",
     r"model.lora.target_modules: \['qkv'\] match no module of LlamaForCausalLM \(tiny\); its linear layers are "
     r"named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
])
def test_bad_lora_settings_are_refused(tmp_path, override, message):
    cfg = make_cfg(tmp_path, "method=ebft", "model.lora.rank=4", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
