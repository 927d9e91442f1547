"""The CPU-runnable parts of the device acceptance check: ``bench/gpu_check.sh --dry-run`` runs every
stage CPU-sized (the gpu tests skip cleanly) and prints the summary table; bad arguments are refused;
the summary marks failed, skipped and missing stages; the actor's FLOP count of a hand-worked case."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ebft.models.loading import build_tiny_model
from ebft.core.layout import StridedLayout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402
import step_cost  # noqa: E402


@pytest.mark.slow  # about 30 s on an idle 2-core machine, minutes under load
def test_dry_run_runs_every_stage_and_prints_the_summary(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run: the wheels in .whl" in done.stdout
    tests = [line for line in summary.splitlines() if line.startswith("| test_")]
    assert len(tests) == 8 and all("| skipped | needs a CUDA device" in line for line in tests)  # 6 + 2 QLoRA
    assert "| step_cost tiny (cpu, sdpa, T=32, batch 1) | ebft_over_sft=" in summary
    assert "| wall time |" in summary
    result = json.loads((tmp_path / "step_cost_tiny.json").read_text())
    assert result["ebft_over_sft"] > 1 and result["actor_mfu"] is None  # no known peak on a CPU


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dryrun"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument '--dryrun'" in done.stderr and "--dry-run" in done.stderr


def test_summary_marks_failures_skips_and_missing_results(tmp_path, capsys):
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite name="pytest">'
                     '<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>'
                     '<testcase classname="tests.test_gpu" name="test_b" time="0.1">'
                     '<failure message="AssertionError: 0.0 != 0.333">trace</failure></testcase>'
                     '<testcase classname="tests.test_gpu" name="test_c" time="0">'
                     '<skipped message="deepspeed is not installed"/></testcase>'
                     '</testsuite></testsuites>')
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"model": "qwen2.5-1.5b-shape", "device": "cuda", "attn": "flex_attention", "T": 1024,
                              "batch": 1, "ebft_over_sft": 3.456, "actor_mfu": 0.4123, "actor_tflops": 407.8,
                              "ebft_step_s": 1.2, "sft_step_s": 0.35, "peak_gib": 30.0}))
    assert gpu_summary.main(["--junit", str(junit), "--step-cost", str(ok), str(tmp_path / "gone.json")]) == 1
    out = capsys.readouterr().out
    assert "| test_a | passed | 1.5 s |" in out
    assert "| test_b | FAILED | AssertionError: 0.0 != 0.333 |" in out
    assert "| test_c | skipped | deepspeed is not installed |" in out
    assert "ebft_over_sft=3.46 | generator fwd+bwd MFU 0.412 (407.8 TFLOP/s)" in out
    assert "| step_cost gone | MISSING |" in out
    junit.write_text('<testsuite><testcase name="test_a" time="1"/></testsuite>')
    assert gpu_summary.main(["--junit", str(junit), "--step-cost", str(ok)]) == 0
    assert gpu_summary.main(["--junit", str(tmp_path / "none.xml")]) == 1


def test_summary_fails_a_memory_plan_off_by_more_than_its_tolerance(tmp_path, capsys):
    near, far = tmp_path / "near.json", tmp_path / "far.json"
    for path, measured in ((near, 30.0), (far, 40.0)):
        path.write_text(json.dumps({"describe": "Qwen2.5-1.5B, EBFT", "planned_gib": 33.0, "measured_gib": measured,
                                    "error": 33.0 / measured - 1, "tolerance": 0.15}))
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite name="pytest"><testcase classname="t" name="test_a" time="1"/>'
                     '</testsuite></testsuites>')
    assert gpu_summary.main(["--junit", str(junit), "--memory", str(near)]) == 0
    assert "| memory plan: Qwen2.5-1.5B, EBFT | passed | planned 33.00 GiB, measured 30.00 GiB (+10.0%" \
        in capsys.readouterr().out
    assert gpu_summary.main(["--junit", str(junit), "--memory", str(near), str(far)]) == 1
    assert "| FAILED | planned 33.00 GiB, measured 40.00 GiB (-17.5%" in capsys.readouterr().out


def test_actor_flops_of_a_hand_worked_case():
    # T=4, C=2, s=1, G=1, n=1: NB=2, row of 6; allowed pairs: chunk 1+2+3+4 = 10, block 0 sees 2 chunk
    # rows + itself = 3, block 1 sees 3 + 1 = 4: 17 pairs; 2 scoring rows + 3 CE rows = 5
    layout = StridedLayout(4, 2, 1, 1, 1)
    model = build_tiny_model(vocab_size=100, num_layers=2, hidden=64)
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    expected = 6 * 6 * layer_params + 6 * 5 * 100 * 64 + 12 * 2 * 4 * 16 * 17  # 4 heads of 16
    assert step_cost.actor_flops(model, layout, batch=1) == expected
    assert step_cost.actor_flops(model, layout, batch=3) == 3 * expected


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", None)])
def test_peak_flops_by_device_name(monkeypatch, name, peak):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert step_cost.peak_flops(torch.device("cuda"), None) == peak
    assert step_cost.peak_flops(torch.device("cuda"), 500.0) == 500e12
    assert step_cost.peak_flops(torch.device("cpu"), None) is None
