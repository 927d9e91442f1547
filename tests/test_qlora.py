"""QLoRA (``model.quantization=4bit``) on the tiny random model with the real ``bitsandbytes`` (CPU) and ``peft``:
the feature network is the 4-bit base with the adapters off (not a full-precision copy), one training step of
every method changes only the adapters, a resumed run continues exactly, the export is a plain model that
computes what was trained, and bad settings are refused before any model loads. Two ``gpu`` tests (run by
``bench/gpu_check.sh``) check the same on CUDA: quantised on the GPU, the feature network is that base, and two
EBFT steps in bf16 with flex_attention change only the adapters."""

import importlib.util
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ebft.app import run as run_module
from ebft.app.card import model_card
from ebft.config import ConfigError
from ebft.core.compat import decoder_layers
from ebft.eval import runner as eval_runner
from ebft.methods import base as methods_base, rlvr
from ebft.methods.ebft import EBFTModule
from ebft.methods.rlvr import RLVRModule, completion_logprobs
from ebft.models import features as features_module
from ebft.models.features import FeatureNetwork
from ebft.models.loading import build_tiny_model, load_model, load_tokenizer
from ebft.models.quantization import bitsandbytes_backends, check_quantization, dequantized_weight, quantized_linears
from tests.test_gpu import VOCAB, tiny_run  # noqa: F401  (a fixture: the GPU tests' local tiny model and rows)
from tests.test_gpu import overrides as gpu_overrides
from tests.test_lora import LORA, frozen_copy, strided_row
from tests.test_train import Crash, CrashAt, make_cfg, train, train_losses, validate

QLORA = [*LORA, "model.quantization=4bit"]
ALL_LINEARS = 4 * 7          # tiny: 4 layers x (q, k, v, o, gate, up, down); the LM head stays unquantised


def quantised_tiny(tokenizer):
    """The tiny base loaded alone in 4 bits, as a QLoRA run loads it."""
    return load_model("tiny", vocab_size=len(tokenizer), quantization="4bit").eval()


def randomise_adapters(model, std=0.1):
    """Adapters that change the function (B starts at 0), so that 'adapters off' is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=std)


# ------------------------------------------------------------------ (a) the feature network is the 4-bit base

def test_feature_network_is_the_quantised_base_with_adapters_off(tmp_path, tokenizer):
    module = EBFTModule(validate(make_cfg(tmp_path, "method=ebft", *QLORA)), tokenizer)
    assert len(quantized_linears(module.generator)) == ALL_LINEARS
    # no copy: phi has no weights of its own and runs the generator's (4-bit) layers
    assert list(module.feature_network.parameters()) == []
    assert decoder_layers(module.feature_network.backbone)[0] is decoder_layers(module.generator)[0]
    randomise_adapters(module.generator)
    spec, row = module.settings.feature_network, strided_row(module.layout)
    alone = FeatureNetwork(quantised_tiny(tokenizer), layers=spec.layers, pooling=spec.pooling,
                           normalisation=spec.normalisation)
    got, want = module.feature_network.strided_features(row, module.layout), alone.strided_features(row, module.layout)
    for g, w in zip(got, want):
        assert torch.equal(g, w)                    # the same quantised weights, bit for bit
    # ... and not the full-precision base: a silent unquantised copy would fail here
    full = frozen_copy(spec).strided_features(row, module.layout)
    assert (got[1] - full[1]).abs().max() > 1e-3
    # the adapters are on outside the feature pass
    on = FeatureNetwork(module.generator, layers=spec.layers).strided_features(row, module.layout)
    assert (on[1] - got[1]).abs().max() > 1e-3


# ------------------------------------------------------------ (b) one step of each method: only adapters move

class BaseWeights(Callback):
    """The generator's full state (4-bit packed weights and their quantisation state included) before
    anything runs and after training."""

    def on_fit_start(self, trainer, pl_module):
        self.quantised = len(quantized_linears(pl_module.generator))
        self.before = {k: v.clone() for k, v in pl_module.generator.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        self.after = {k: v.clone() for k, v in pl_module.generator.state_dict().items()}


@pytest.fixture
def loads(monkeypatch):
    """Every ``load_model`` call of training (generator, feature network, KL reference, calibration) as
    ``(name, quantization)``."""
    calls = []

    def spy(name, *args, **kwargs):
        calls.append((name, kwargs.get("quantization")))
        return load_model(name, *args, **kwargs)

    for module in (methods_base, features_module, rlvr, eval_runner):
        monkeypatch.setattr(module, "load_model", spy)
    return calls


METHOD_STEP = {
    # SFT with the in-training calibration on: its feature network is the generator's 4-bit base too
    "sft": ["method=sft", "eval.every_n_steps=1", "eval.cfm_chunks=2", "eval.cfm_train_chunks=0"],
    "ebft": ["method=ebft"],
    # the KL term runs the reference (the base, adapters off); a dense reward so that the step moves
    "rlvr": ["method=rlvr", "task=translation", "method.max_new_tokens=6", "method.num_samples=4",
             "method.kl_coef=0.05"],
}


@pytest.mark.parametrize("method", sorted(METHOD_STEP))
def test_one_step_of_each_method_trains_only_the_adapters(method, tmp_path, monkeypatch, loads):
    monkeypatch.setattr(rlvr, "reward_fn_for", lambda task: lambda texts, rows: [t.count("e") / (1 + len(t))
                                                                                 for t in texts])
    weights, original = BaseWeights(), run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer",
                        lambda settings, out, cbs: original(settings, out, [weights, *cbs]))
    summary = train(make_cfg(tmp_path, *METHOD_STEP[method], *QLORA, "trainer.max_steps=1"))
    assert summary["steps"] == 1
    assert loads == [("tiny", "4bit")]              # the generator, once, in 4 bits: no other copy anywhere
    assert weights.quantised == ALL_LINEARS
    before, after = weights.before, weights.after
    assert before.keys() == after.keys()
    frozen = [k for k in before if ".lora_" not in k]
    assert any(k.endswith(".weight.absmax") for k in frozen)        # the packed weights and their state
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)
    if method == "sft":
        assert sorted(train_losses(tmp_path, "val/cfm")) == [0, 1]


# ------------------------------------------------------------------------------- (c) resume, (d) export

@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory):
    """SFT with QLoRA: an uninterrupted 2-step run, and one that crashes after step 1 and is resumed."""
    root = tmp_path_factory.mktemp("qlora")
    extra = ["method=sft", "trainer.max_steps=2", "trainer.val_check_interval=1", "method.schedule=cosine", *QLORA]
    train(make_cfg(root / "full", *extra))
    original = run_module.build_trainer
    run_module.build_trainer = lambda settings, out, cbs: original(settings, out, [*cbs, CrashAt(1)])
    try:
        with pytest.raises(Crash):
            train(make_cfg(root / "crashed", *extra))
    finally:
        run_module.build_trainer = original
    train(make_cfg(root / "resumed", *extra, f"ckpt_path={root / 'crashed'}"))
    return root


def test_qlora_checkpoints_hold_adapters_only_and_resume_exactly(qlora_runs):
    ckpt = torch.load(qlora_runs / "crashed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])    # no 4-bit base inside
    assert len(ckpt["optimizer_states"][0]["state"]) == len(ckpt["state_dict"])
    expected, got = train_losses(qlora_runs / "full", "train/ce"), train_losses(qlora_runs / "resumed", "train/ce")
    assert sorted(got) == [1]
    assert got[1] == pytest.approx(expected[1], rel=1e-6, abs=1e-7)
    full = load_file(qlora_runs / "full" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(qlora_runs / "resumed" / "adapter" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and any(v.abs().max() > 0 for k, v in full.items() if "lora_B" in k)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7)


def test_resuming_over_another_base_is_refused(qlora_runs, tmp_path, loads):
    crashed = qlora_runs / "crashed"
    with pytest.raises(ConfigError, match=r"was trained with model.quantization=4bit, not null: its adapters belong "
                                          r"to that base; resume it with model.quantization=4bit"):
        train(make_cfg(tmp_path / "a", "method=sft", *LORA, f"ckpt_path={crashed}"))
    assert loads == []


def test_qlora_export_is_a_plain_model_computing_the_trained_function(qlora_runs, tokenizer):
    run = qlora_runs / "full"
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model").eval()
    assert getattr(exported.config, "quantization_config", None) is None and not quantized_linears(exported)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    trained = PeftModel.from_pretrained(quantised_tiny(tokenizer), run / "adapter").eval()       # 4-bit + adapters
    full_base = PeftModel.from_pretrained(build_tiny_model(vocab_size=len(tokenizer)), run / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        got, want, unquantised = exported(ids).logits, trained(ids).logits, full_base(ids).logits
    # fp32 throughout: the export multiplies by W_hat + s B A where training computed W_hat x + s B (A x), so
    # they differ by float32 rounding of the sums (~1e-6 of logits of size ~1), far inside 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - unquantised).abs().max() > 1e-2     # not the full-precision base plus the adapters
    card = (run / "hf_model" / "README.md").read_text()
    assert "trained quantised to 4-bit NF4" in card and "dequantised to float32 with the LoRA adapters merged" in card


def test_rlvr_warm_started_from_a_qlora_run_has_its_initial_policy_as_reference(qlora_runs, tmp_path, tokenizer):
    run = qlora_runs / "full"
    module = RLVRModule(validate(make_cfg(tmp_path, "method=rlvr", "task=translation", f"init_from={run}",
                                          "method.kl_coef=0.05", *QLORA)), tokenizer)
    assert len(quantized_linears(module.reference)) == ALL_LINEARS     # 4 bits, never a full-precision copy
    assert not any(p.requires_grad for p in module.reference.parameters())
    ids, mask = torch.randint(0, 1000, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    completions = torch.randint(0, 1000, (2, 5))
    module.generator.eval()
    with torch.no_grad():
        policy = completion_logprobs(module.generator, ids, mask, completions)
        reference = completion_logprobs(module.reference, ids, mask, completions)
        base = completion_logprobs(quantised_tiny(tokenizer), ids, mask, completions)
    assert torch.equal(reference, policy)          # the run's adapter over the same 4-bit base
    assert (reference - base).abs().max() > 1e-3   # ... which is not the base alone


# ------------------------------------------------------------------------------------------- (e) refusals

@pytest.mark.parametrize("overrides,message", [
    (["model.quantization=4bit"], r"model.quantization=4bit freezes the base in 4 bits and trains LoRA adapters over "
                                  r"it, but LoRA is off: set model.lora.rank \(e.g. model.lora.rank=16\)"),
    (["model.quantization=8bit", "model.lora.rank=4"], r"model.quantization='8bit' is not one of null, 4bit"),
    (["model.quantization=4bit", "model.lora.rank=4", "trainer=fsdp"],
     r"model.lora with trainer=fsdp is not supported"),
])
def test_bad_quantization_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(tmp_path, "method=ebft", *overrides))


def test_bitsandbytes_must_run_on_the_training_device():
    assert "cpu" in bitsandbytes_backends()        # the pinned bitsandbytes (>= 0.50) runs 4-bit layers on CPU
    check_quantization("4bit", "cpu")
    check_quantization("4bit", "cuda", backends={"cpu", "cuda"})
    check_quantization(None, "cuda", backends=())
    with pytest.raises(ConfigError, match=r"model.quantization=4bit on cuda: the installed bitsandbytes \S+ cannot run "
                                          r"4-bit layers there \(it runs on: cpu\); .*pip install -U bitsandbytes"):
        check_quantization("4bit", "cuda", backends={"cpu"})
    with pytest.raises(ConfigError, match=r"on cpu: .*\(it runs on: nothing here\)"):
        check_quantization("4bit", "cpu", backends=())


def test_missing_bitsandbytes_is_refused_before_any_model_loads(tmp_path, monkeypatch, loads):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)     # what `import bitsandbytes` meets when not installed
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes library, which is not installed: "
                                          r"pip install bitsandbytes"):
        train(make_cfg(tmp_path, "method=ebft", *QLORA))
    assert loads == []


def test_the_card_of_a_full_precision_run_says_nothing_of_quantisation(tmp_path):
    lora = model_card(validate(make_cfg(tmp_path, "method=sft", *LORA)), {}, 1, "python train.py")
    assert "| LoRA | rank 4, lora_alpha 8 on the attention and MLP projections" in lora
    assert "4-bit" not in lora and "dequantised" not in lora
    qlora = model_card(validate(make_cfg(tmp_path, "method=sft", *QLORA)), {}, 1, "python train.py")
    assert "| base in training | 4-bit NF4 (QLoRA: bitsandbytes, double quantisation), compute dtype float32" in qlora



# --------------------------------------------------------------------- on a GPU (bench/gpu_check.sh runs these)
# test_gpu's tiny local model (a BPE tokenizer trained on the spot: no hub and no GGUF on the device) and code rows

def on_gpu(test):
    """gpu-marked, skipped without CUDA (first: the dry run's reason) or without bitsandbytes."""
    marks = [pytest.mark.gpu,
             pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: run bench/gpu_check.sh on a GPU machine"),
             pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed (bench/gpu_check.sh installs it from carried "
                                       "wheels)")]
    for mark in reversed(marks):
        test = mark(test)
    return test


@on_gpu
def test_qlora_on_cuda_quantises_there_and_the_feature_network_is_that_base(tiny_run, tmp_path):
    """In fp32 compute (so that equality is exact): the base quantised on the GPU is the one a separate
    load gives, and the feature network's features are that 4-bit model's, not the full-precision one's."""
    model_dir, data = tiny_run
    assert "cuda" in bitsandbytes_backends()
    settings = validate(make_cfg(tmp_path, base=gpu_overrides(model_dir, data, *QLORA, "model.dtype=float32",
                                                             "model.attn_implementation=sdpa")))
    tokenizer = load_tokenizer(str(model_dir))
    module = EBFTModule(settings, tokenizer).cuda()
    layers = quantized_linears(module.generator)
    assert len(layers) == ALL_LINEARS and all(m.weight.device.type == "cuda" for m in layers.values())
    alone = load_model(str(model_dir), dtype=torch.float32, quantization="4bit", device="cuda")
    for (name, layer), other in zip(layers.items(), quantized_linears(alone).values()):
        assert torch.equal(layer.weight.data, other.weight.data), name                # the same 4-bit codes
        assert torch.equal(dequantized_weight(layer), dequantized_weight(other)), name  # and scales
    randomise_adapters(module.generator)
    spec = settings.feature_network
    kwargs = {"layers": spec.layers, "pooling": spec.pooling, "normalisation": spec.normalisation}
    layout, g = module.layout, torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, layout.seq_len), generator=g)
    tokens = torch.randint(0, VOCAB, (2, layout.num_samples, layout.num_blocks, layout.gen_len), generator=g)
    row = layout.scatter_generated(ids, tokens).cuda()
    got = module.feature_network.strided_features(row, module.layout)
    want = FeatureNetwork(alone, **kwargs).strided_features(row, module.layout)
    full = FeatureNetwork(load_model(str(model_dir), dtype=torch.float32).cuda(), **kwargs).strided_features(
        row, module.layout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[1] - full[1]).abs().max() > 1e-3


@on_gpu
def test_qlora_ebft_steps_on_cuda_train_only_the_adapters(tiny_run, tmp_path, monkeypatch, loads):
    """Two EBFT steps as a GPU run takes them: bf16 compute over the 4-bit base, flex_attention, bf16-mixed."""
    weights, original = BaseWeights(), run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer",
                        lambda settings, out, cbs: original(settings, out, [weights, *cbs]))
    summary = train(make_cfg(tmp_path, base=gpu_overrides(*tiny_run, *QLORA, "trainer.max_steps=2")))
    assert summary["steps"] == 2 and loads == [(str(tiny_run[0]), "4bit")]
    assert weights.quantised == ALL_LINEARS
    frozen = [k for k in weights.before if ".lora_" not in k]
    assert all(torch.equal(weights.before[k], weights.after[k]) for k in frozen)
    assert any(not torch.equal(weights.before[k], weights.after[k]) for k in weights.before if ".lora_B." in k)
    losses = train_losses(tmp_path, "train/loss")
    assert sorted(losses) == [0, 1] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model", dtype="auto")
    assert not quantized_linears(exported) and {p.dtype for p in exported.parameters()} == {torch.bfloat16}
