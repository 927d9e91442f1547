"""One real EBFT step at a true paper shape on this CPU: the smallest paper model's architecture
(Llama-3.2-1B, random weights, LoRA r=16 over a bf16 base so that it fits 24 GB) in the paper's
translation recipe (T=1024, C=4, s=2, G=4: strided rows of 9,168 tokens, mean pooling, reference
whitening, gradient checkpointing), one chunk per step. It records the step's peak memory and time
and checks the memory planner against them (``bench/memory.py --check`` prints the same row)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402


@pytest.mark.slow  # about 20 min on an idle 2-core CPU
def test_one_step_at_the_paper_shape_fits_the_plan(tmp_path):
    results = tmp_path / "memory_check.json"
    (row,) = memory.check(results, only=[memory.PAPER_SHAPE])
    measured = json.loads(results.read_text())[memory.PAPER_SHAPE]
    print(f"\n{memory.PAPER_SHAPE}: peak {row['measured_gib']:.2f} GiB (planned {row['predicted_gib']:.2f}), "
          f"step {measured['step_seconds'][-1]:.0f} s")
    assert row["measured_gib"] < 24
    assert abs(row["error"]) <= memory.TOLERANCE
