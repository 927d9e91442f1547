"""The memory planner (``ebft.app.memory``, ``bench/memory.py``): its per-layer activation count equals
the bytes a real decoder layer saves for its backward; its plan is within 15% of a measured peak of real
training steps; the documented command runs offline in seconds; the largest micro-batch that fits is
the boundary of the plan."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebft.app.memory import (GIB, Precision, attention_extra, largest_micro_batch, layer_bytes, model_shape, plan,
                             usable_bytes)
from ebft.app.peak import measure
from ebft.config import compose_config, train_settings
from ebft.core.layout import StridedLayout
from ebft.core.strided import strided_hidden
from ebft.models.loading import build_random_model, random_config, resolve_source

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def saved_bytes(model, forward) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during ``forward()``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def per_layer_saved(name: str, lora: bool, layout: StridedLayout | None, tokens: int, base: torch.dtype,
                    autocast: bool) -> int:
    """Saved bytes of a 2-layer minus a 1-layer model of ``name``'s family: one decoder layer's share
    (the embedding, final norm and masks cancel). ``base``: the weights' dtype (LoRA: the frozen base's;
    the adapters are fp32, as ``ebft.models.lora`` makes them); ``autocast``: bf16 autocast, as
    bf16-mixed on CUDA (here on the CPU)."""
    out = []
    for layers in (1, 2):
        config = random_config(resolve_source(name))
        config.num_hidden_layers = layers
        model = build_random_model(config, dtype=base)
        if lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=4, target_modules=list(TARGETS))).base_model.model
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.data = param.data.float()
        ids = torch.randint(0, 1000, (1, tokens))
        if layout is None:
            forward = lambda: model.model(input_ids=ids)   # noqa: E731
        else:
            forward = lambda: strided_hidden(model, ids, layout)   # noqa: E731
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out.append(saved_bytes(model, forward))
    return out[1] - out[0]


CASES = {  # (model, LoRA, strided rows, weights dtype, bf16 autocast)
    "qwen full fp32 strided": ("tiny:Qwen/Qwen2.5-0.5B", False, True, torch.float32, False),
    "qwen lora fp32 strided": ("tiny:Qwen/Qwen2.5-0.5B", True, True, torch.float32, False),
    "llama full fp32 causal": ("tiny:meta-llama/Llama-3.2-1B", False, False, torch.float32, False),
    "llama lora bf16 base causal": ("tiny:meta-llama/Llama-3.2-1B", True, False, torch.bfloat16, False),
    "qwen lora bf16 base strided": ("tiny:Qwen/Qwen2.5-0.5B", True, True, torch.bfloat16, False),
    "llama full autocast causal": ("tiny:meta-llama/Llama-3.2-1B", False, False, torch.float32, True),
    "llama lora bf16 base autocast causal": ("tiny:meta-llama/Llama-3.2-1B", True, False, torch.bfloat16, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_count_equals_what_a_real_layer_saves(case):
    name, lora, strided, base, autocast = CASES[case]
    layout = StridedLayout(64, 8, 8, 8, 4) if strided else None
    tokens = layout.length if strided else 96
    shape = model_shape(name, 4 if lora else None, TARGETS)
    weights = base.itemsize
    p = Precision(weights=weights, compute=2 if autocast else weights, trainable=4, mixed=autocast)
    planned = tokens * layer_bytes(shape, p, not lora, 4 if lora else 0)
    planned += attention_extra(shape, p, "banded" if strided else "causal", 1, layout, lora)
    if autocast:   # the layer's bf16 weight copies, saved too: the plan counts them once, as "bf16 copies"
        trained = shape.lora_params[4] // shape.layers if lora else shape.layer_params - 2 * shape.hidden
        planned += 2 * trained
    measured = per_layer_saved(name, lora, layout, tokens, base, autocast)
    assert abs(planned / measured - 1) < 0.02, (planned, measured)


def train_cfg(*overrides: str):
    return train_settings(compose_config("train", [*overrides, "trainer.accelerator=cpu", "output_dir=unused"]))


def test_plan_is_within_15_percent_of_measured_steps():
    overrides = ["model.name=tiny:Qwen/Qwen2.5-0.5B", "task.seq_len=128", "data.limit=200", "data.val_size=20"]
    measured = measure(overrides, timeout=600)["step_peak_bytes"][-1]
    planned = plan(train_cfg(*overrides)).total
    assert abs(planned / measured - 1) < 0.15, (planned / GIB, measured / GIB)


def test_documented_command_runs_offline_in_seconds_and_itemises():
    done = subprocess.run([sys.executable, "bench/memory.py", "experiment=paper_qa_code", "model=qwen2.5-7b",
                           "model.lora.rank=16", "--card-gib", "80"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "Qwen/Qwen2.5-7B (7.62B parameters)" in out and "strided rows of 5088 tokens" in out
    for item in ("| weights |", "| gradients |", "| adam |", "| frozen |", "KV cache", "checkpointed layer inputs",
                 "feature network: the base with the adapters off", "largest micro-batch that fits"):
        assert item in out, item


def test_full_fine_tuning_of_7b_does_not_fit_one_card_but_fsdp_over_8_does():
    full = train_cfg("experiment=paper_qa_code", "model=qwen2.5-7b")
    assert plan(full).total > 80 * GIB and largest_micro_batch(full, 80) == 0
    sharded = train_cfg("experiment=paper_qa_code", "model=qwen2.5-7b", "trainer=fsdp", "trainer.devices=8")
    assert plan(sharded).total < plan(full).total / 3
    assert largest_micro_batch(sharded, 80) >= 1


def test_a_4bit_base_saves_what_its_weights_save():
    lora = ["experiment=paper_qa_code", "model=qwen2.5-7b", "model.lora.rank=16", "method.batch_size=1",
            "model.dtype=bfloat16"]
    bf16, nf4 = plan(train_cfg(*lora)), plan(train_cfg(*lora, "model.quantization=4bit"))
    shape = model_shape("Qwen/Qwen2.5-7B")
    linear = shape.layers * (shape.layer_params - 2 * shape.hidden)      # the decoder's projections
    saved = bf16.state["frozen"] - nf4.state["frozen"]
    assert saved == pytest.approx(linear * (2 - (0.5 + 1 / 64 + 4 / (64 * 256))), rel=1e-9)
    assert 9 * GIB < saved < 10 * GIB


def test_largest_micro_batch_is_the_boundary_of_the_plan():
    settings = train_cfg("experiment=paper_qa_code", "model=qwen2.5-1.5b", "model.lora.rank=16")
    fits = largest_micro_batch(settings, 24)
    assert fits >= 1
    assert plan(settings, fits).total <= usable_bytes(24) < plan(settings, fits + 1).total
