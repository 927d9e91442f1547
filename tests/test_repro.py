"""The small reproduction driver (experiments.repro): its plan, lr choice, paired comparisons, resumable jobs and
the report written from synthetic run directories (fast); the whole pipeline on the tiny model (slow)."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebft.eval.report import UNITS_FILE
from experiments.repro.__main__ import main
from experiments.repro.comparison import compare, curve
from experiments.repro.diagnosis import diagnose
from experiments.repro.jobs import Job, finished, run_job
from experiments.repro.plan import (PARTS, PLAN, matches, models, pending, read_results, sweep_jobs, training_jobs,
                                    write_plan)
from experiments.repro.readme import trained_lrs, write_report
from experiments.repro.settings import ROOT as REPO, ReproError, format_lr, load_settings, merge_overrides, val_interval
from experiments.repro.sweep import SweepPoint, choose
from experiments.repro.tables import Stat, attach_results

ROOT = Path(__file__).resolve().parents[1]
MBPP = Path(os.environ.get("EBFT_MBPP", "/nonexistent"))   # MBPP rows, when the machine has them


# ------------------------------------------------------------------------------- settings, plan

def test_helpers():
    assert format_lr(1e-4) == "1e-4" and format_lr(3e-5) == "3e-5" and format_lr(2.5e-5) == "2.5e-5"
    assert merge_overrides(["a=1", "b=2"], ["a=3"]) == ["b=2", "a=3"]
    assert val_interval(40, 10) == 10 and val_interval(25, 10) == 5 and val_interval(3, 10) == 3
    plan = {"variants": {"sft": {"method": "sft"}, "ebft": {"method": "ebft"}}, "lr": {"sft": 1e-4, "rlvr": 1e-5}}
    assert trained_lrs(plan) == {"sft": 1e-4}    # the config's lr of a method left out is not reported


def test_every_method_gets_the_same_budget(tmp_path):
    s = load_settings(tmp_path, steps=18, seeds=[1, 2])
    planned = models(s, s.lr)
    assert [m["variant"] for m in planned] == ["base", "sft", "sft", "ebft", "ebft", *["ebft_no_whitening"] * 2]
    assert [m.get("seed") for m in planned] == [None, 1, 2, 1, 2, 1, 2]
    one_seed = load_settings(tmp_path, steps=18, seeds=[1, 2], overrides=["repro.first_seed_only=[ebft_no_whitening]"])
    assert [m.get("seed") for m in models(one_seed, s.lr)] == [None, 1, 2, 1, 2, 1]   # the ablation at seed 1 only
    jobs = training_jobs(s, planned)
    assert len(jobs) == 6
    for job in jobs:
        assert "trainer.max_steps=18" in job.argv and "trainer.val_check_interval=18" in job.argv
        assert "experiment=repro_small" in job.argv and "data.mbpp_path=null" in job.argv
    methods = {a.split("=")[1] for j in jobs for a in j.argv if a.startswith("method=")}
    assert methods == {"sft", "ebft"}
    assert {v.knobs["batch_size"] for v in s.variants.values()} == {1}
    ebft = {n: v for n, v in s.variants.items() if v.method == "ebft"}
    assert {n: v.knobs["whitening"] for n, v in ebft.items()} == {"ebft": "reference", "ebft_no_whitening": "none"}
    assert all(v.knobs["alpha"] == 1.0 and v.knobs["gamma"] == 0.03 for v in ebft.values())
    assert s.parts == ("calibration", "profile")
    with_flags = load_settings(tmp_path, steps=18, seeds=[1, 2], rlvr=True, downstream=True)
    assert "rlvr" in with_flags.variants and with_flags.parts[-1] == "downstream"


def test_full_length_sweep_runs_are_the_first_seeds_runs(tmp_path):
    """The sweep's run at the chosen lr is the headline run of its seed: same directory, same command,
    so the driver skips it instead of training it again."""
    s = load_settings(tmp_path, steps=18, seeds=[43, 44])
    sweep = {job.directory: job.command for job in sweep_jobs(s)}
    assert len(sweep) == 4 and all("/runs/" in str(d) for d in sweep)   # 2 lrs x (sft, ebft)
    planned = models(s, {"sft": 1e-4, "ebft": 3e-4})
    headline = {job.directory: job.command for job in training_jobs(s, planned)}
    shared = set(sweep) & set(headline)
    assert {d.parts[-2] for d in shared} == {"sft", "ebft"} and all(sweep[d] == headline[d] for d in shared)
    short = load_settings(tmp_path, steps=18, seeds=[43, 44], overrides=["repro.lr_sweep.steps=6"])
    assert all("lr_sweep" in str(job.directory) for job in sweep_jobs(short))


def test_quick_profile_and_missing_mbpp(tmp_path):
    s = load_settings(tmp_path, quick=True, mbpp=None)
    assert s.base_ckpt == "tiny" and s.seeds == (43, 44) and s.evaluation["calibration"]["skip"] == 4
    assert "model=tiny" in s.eval_common and s.benchmarks == ["humaneval"]
    with pytest.raises(ReproError, match="does not exist"):
        load_settings(tmp_path, mbpp=str(tmp_path / "nope.jsonl"))


def test_plan_records_paths_relative_to_the_repository(tmp_path):
    out = REPO / "outputs" / f"test-repro-paths-{tmp_path.name}"   # inside the repository, named absolutely
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("{}\n")
    try:
        s = load_settings(out, quick=True, mbpp=str(mbpp))
        argv = ["--quick", "--out", str(out), f"--mbpp={mbpp}", "--seeds", "43"]
        text = write_plan(s, models(s, dict(s.lr)), dict(s.lr), "config", argv).read_text()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    plan = json.loads(text)
    relative_out, relative_mbpp = f"outputs/{out.name}", os.path.relpath(mbpp, REPO)
    assert plan["command"] == (f"python -m experiments.repro --quick --out {relative_out} --mbpp={relative_mbpp} "
                               "--seeds 43")
    assert str(REPO) not in text and not re.search(f'[ ="]{re.escape(str(tmp_path))}', text)  # no absolute path
    assert plan["eval"]["mbpp_path"] == relative_mbpp
    assert {m["ckpt"] for m in plan["models"] if m.get("dir")} == {f"{relative_out}/{m['dir']}"
                                                                    for m in plan["models"] if m.get("dir")}


def test_results_map_to_models_by_checkpoint():
    run = {"key": "runs/sft/lr1e-4-seed43", "variant": "sft", "ckpt": "results/x/runs/sft/lr1e-4-seed43"}
    base = {"key": "base", "variant": "base", "ckpt": "tiny"}
    moved = {"ckpt": "/elsewhere/runs/sft/lr1e-4-seed43"}
    assert matches(run, moved) and not matches(run, {"ckpt": "runs/sft/lr1e-4-seed44"})
    assert matches(base, {"ckpt": "tiny"}) and not matches(base, moved)
    assert pending([base, run], [moved]) == [base]


# ------------------------------------------------------------------------------- lr choice, verdicts

def point(lr, ce, cfm, se=0.01, ok=True):
    return SweepPoint("ebft", "ebft", lr, f"lr{lr}", ok, ce, cfm, se)


def test_lr_choice_prefers_cfm_then_breaks_ties_by_ce():
    assert choose([point(1e-5, 3.0, 0.40), point(1e-4, 2.5, 0.50)]).lr == 1e-5   # CFM clearly better
    assert choose([point(1e-5, 3.0, 0.50), point(1e-4, 2.5, 0.51)]).lr == 1e-4   # tied on CFM: CE decides
    assert choose([point(1e-5, 3.0, 0.5), point(1e-3, math.nan, math.nan, ok=False)]).lr == 1e-5
    with pytest.raises(ReproError, match="diverged"):
        choose([point(1e-3, 0, 0, ok=False)])


def test_paired_comparison_pools_seeds_on_the_same_units(tmp_path):
    """EBFT - SFT per unit at each seed, then averaged over seeds; the base model pairs with every seed."""
    def model(variant, seed, values):
        d = tmp_path / f"{variant}{seed}"
        d.mkdir()
        (d / UNITS_FILE).write_text(json.dumps({"cfm": values}))
        return {"variant": variant, "seed": seed, "calibration": {"_call": str(d)}}
    models = [model("base", None, [[0.5, 0.6], [0.4, 0.3]]),
              model("sft", 43, [[0.5, 0.6], [0.4, 0.3]]), model("sft", 44, [[0.6, 0.6], [0.4, 0.4]]),
              model("ebft", 43, [[0.4, 0.5], [0.4, 0.2]]), model("ebft", 44, [[0.5, 0.6], [0.3, 0.3]])]
    c = compare(models, "ebft", "sft", "FM", "calibration", "cfm")
    pooled = [(-0.1 - 0.1) / 2, (-0.1 + 0.0) / 2, (0.0 - 0.1) / 2, (-0.1 - 0.1) / 2]
    assert c.diff.n == 4 and c.diff.mean == pytest.approx(sum(pooled) / 4)
    assert c.per_seed == {43: pytest.approx(-0.075), 44: pytest.approx(-0.075)}
    assert c.outcome == "yes (lower)" and c.value == pytest.approx(0.4) and c.reference_value == pytest.approx(0.475)
    vs_base = compare(models, "sft", "base", "FM", "calibration", "cfm")
    assert vs_base.per_seed == {43: 0.0, 44: pytest.approx(0.05)}
    assert compare(models, "ebft", "sft", "CE", "calibration", "ce") is None     # not evaluated: no row


# ------------------------------------------------------------------------------- resumable jobs

def test_jobs_skip_when_done_and_refuse_other_commands(tmp_path, capsys):
    job = Job("hello", ("-c", "import os; os.makedirs('{0}/bulky'); os.makedirs('{0}/.hydra'); "
                               "open('{0}/.hydra/hydra.yaml', 'w'); print('hi')".format(tmp_path / "j")),
              tmp_path / "j", discard=("bulky", ".hydra/hydra.yaml"))
    record = run_job(job, 1, 1)
    assert record["returncode"] == 0 and (tmp_path / "j" / "stdout.log").read_text() == "hi\n"
    assert not (tmp_path / "j" / "bulky").exists() and record["cpu_seconds"] >= 0
    assert (tmp_path / "j" / ".hydra").is_dir() and not (tmp_path / "j" / ".hydra" / "hydra.yaml").exists()
    assert finished(job) is not None
    run_job(job, 1, 1)
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ReproError, match="different command"):
        finished(Job("hello", ("-c", "print('ho')"), tmp_path / "j"))
    failing = Job("boom", ("-c", "raise SystemExit(3)"), tmp_path / "f")
    with pytest.raises(ReproError, match="exit 3"):
        run_job(failing, 1, 1)
    assert finished(failing) is None   # a failed job runs again next time
    assert run_job(Job("boom", failing.argv, tmp_path / "g", may_fail=True), 1, 1)["returncode"] == 3
    # a job that may fail but was stopped (SIGTERM: exit 143, or killed) is not a result: it runs again
    for code, name in ((143, "t"), (-9, "k")):
        stopped = Job("stopped", (f"-c", f"import os, signal; os.kill(os.getpid(), 9) if {code} < 0 else exit({code})"),
                      tmp_path / name, may_fail=True)
        with pytest.raises(ReproError, match=f"exit {code}"):
            run_job(stopped, 1, 1)
        assert finished(stopped) is None


def test_an_interrupted_training_job_continues_from_its_checkpoint(tmp_path):
    """A job with a checkpoint is re-run with ckpt_path= appended (same directory, log appended); one
    without a checkpoint starts over."""
    d = tmp_path / "run"
    script = ("import os, sys; d = sys.argv[1]; os.makedirs(d + '/checkpoints', exist_ok=True); "
              "open(d + '/checkpoints/last.ckpt', 'w').write('x'); print('args', sys.argv[2:]); "
              "sys.exit(0 if len(sys.argv) > 2 else 9)")
    job = Job("train", ("-c", script, str(d)), d, checkpoint="checkpoints/last.ckpt")
    with pytest.raises(ReproError, match="exit 9"):
        run_job(job, 1, 1)
    record = run_job(job, 1, 1)
    assert record["returncode"] == 0 and record["resumed_with"].startswith("ckpt_path=")
    assert record["resumed_with"].endswith("run/checkpoints/last.ckpt")
    log = (d / "stdout.log").read_text()
    assert log.startswith("args []") and "args ['ckpt_path=" in log
    assert record["command"] == job.command        # the job is the same job: a later call skips it
    assert finished(job) is not None


# ------------------------------------------------------------------------------- report from synthetic runs

VARIANTS = {
    "sft": {"label": "SFT", "method": "sft", "overrides": ["method=sft"], "knobs": {"batch_size": 2}},
    "ebft": {"label": "EBFT (α=1, γ=0.03, whitened)", "method": "ebft", "overrides": ["method=ebft"],
             "knobs": {"batch_size": 2, "alpha": 1.0, "gamma": 0.03, "whitening": "reference", "num_samples": 4,
                       "temperature": 0.6}},
    "rlvr": {"label": "RLVR", "method": "rlvr", "overrides": ["method=rlvr"],
             "knobs": {"batch_size": 2, "num_samples": 4, "max_new_tokens": 128, "temperature": 1.0}},
}


def write_run(directory: Path, method: str, seed: int, steps: int = 8, val_change: float = -0.01) -> None:
    directory.mkdir(parents=True)
    rows = [{"step": 0, "val/ce": 3.0, "val/cfm": 0.50, "val/cfm_se": 0.01}]
    for s in range(steps):
        row = {"step": s, "train/ce": 3.0 - 0.05 * s}
        if method == "ebft":
            row.update({"train/reward": 1.0 + 0.01 * s + 0.001 * seed, "train/reward_std": 0.2,
                        "train/advantage_std": 0.15, "train/alignment": 1.0, "train/diversity": 0.0,
                        "train/duplicate_fraction": 0.05, "perf/sample_s": 1.5})
        if method == "rlvr":
            row = {"step": s, "train/reward": 0.0, "train/zero_signal_fraction": 1.0, "train/advantage_std": 0.0}
        rows.append(row)
    rows.append({"step": steps, "val/ce": 2.8 if method == "sft" else 2.95, "val/cfm": 0.49, "val/cfm_se": 0.01,
                 "val/cfm_change": val_change, "val/cfm_change_se": 0.004,
                 "train/cfm_fixed": 0.3, "train/cfm_fixed_change": -0.2 if method == "sft" else -0.1,
                 "train/cfm_fixed_change_se": 0.01})
    keys = sorted({k for r in rows for k in r})
    with (directory / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (directory / "job.json").write_text(json.dumps({"command": f"python train.py method={method} seed={seed}",
                                                    "returncode": 0, "seconds": 40.0}))


def write_result(call: Path, index: int, ckpt: str, part: str, shift: float) -> None:
    directory = call / f"{index:02d}-m"
    directory.mkdir(parents=True)
    wobble = [[0.01 * ((i * 7 + k * 3) % 5 - 2) for k in range(4)] for i in range(6)]   # per-context spread
    if part == "calibration":
        (directory / UNITS_FILE).write_text(json.dumps({
            "cfm": [[0.5 + shift + w for w in row] for row in wobble],
            "ce": [2.9 + shift + row[0] for row in wobble]}))
    if part == "profile":
        (directory / UNITS_FILE).write_text(json.dumps({"profile": {
            str(g): [[0.3 + shift + 0.05 * i + w for w in row] for row in wobble]
            for i, g in enumerate([1, 2, 4, 8, 16, 32])}}))
    result = {"model": ckpt, "ckpt": ckpt, "task": "qa_code", "order": [0, index], "settings": {"limit": 20}}
    if part == "calibration":
        result["calibration"] = {"ce": 2.9 + shift, "ce_answer": 2.0, "cfm": 0.5 + shift, "cfm_se": 0.006,
                                 "cfm_whitened": 0.4}
    elif part == "profile":
        result["profile"] = {"G": [1, 2, 4, 8, 16, 32], "cfm": [0.3 + shift + 0.05 * i for i in range(6)],
                             "se": [0.01] * 6}
    else:
        result["downstream"] = {"HumanEval": {"greedy": 0.1 - shift, "pass@1": 0.1, "pass@4": 0.2},
                                "MBPP": {"greedy": 0.05, "pass@1": 0.05, "pass@4": 0.1}}
    (directory / "results.json").write_text(json.dumps(result))


SHIFTS = {"base": 0.0, "sft": -0.02, "ebft": -0.03, "rlvr": 0.03}   # per-unit offsets: EBFT below SFT


def synthetic_output(out: Path, shifts: dict = SHIFTS, val_change: dict | None = None) -> dict:
    """An output folder as the driver leaves it: plan.json, 3 variants x 2 seeds, both evaluation parts;
    each model's per-unit values are offset by ``shifts`` and its runs' held-out CFM changed by ``val_change``."""
    planned = [{"key": "base", "variant": "base", "label": "Base", "ckpt": "embedded:smollm2-135m-instruct"}]
    for name, v in VARIANTS.items():
        for seed in (43, 44):
            key = f"runs/{name}/lr1e-4-seed{seed}"
            planned.append({"key": key, "variant": name, "label": v["label"], "method": v["method"], "seed": seed,
                            "lr": 1e-4, "dir": key, "ckpt": str(out / key)})
            write_run(out / key, v["method"], seed, val_change=(val_change or {}).get(name, -0.01))
    for part in ("calibration", "profile", "downstream"):
        call = out / "eval" / part / "call00"
        for i, m in enumerate(planned):
            write_result(call, i, m["ckpt"], part, shifts[m["variant"]] + 0.002 * ((m.get("seed") or 43) - 43))
        (call / "job.json").write_text(json.dumps({"command": f"python evaluate.py part={part}", "returncode": 0,
                                                   "seconds": 120.0}))
    sweep_runs = [{"variant": "sft", "method": "sft", "lr": lr, "dir": f"lr_sweep/sft/lr{format_lr(lr)}"}
                  for lr in (1e-5, 1e-4)]
    for entry in sweep_runs:
        write_run(out / entry["dir"], "sft", 43, steps=2)
    plan = {"command": "python -m experiments.repro --lr-sweep", "quick": False,
            "sizes": {"model": "embedded:smollm2-135m-instruct", "task": "qa_code", "seq_len": 128, "context_len": 8,
                      "stride": 8, "gen_len": 8, "blocks": 15, "batch_size": 2, "steps": 8, "val_size": 1000,
                      "data_limit": None, "in_training_cfm_chunks": 16, "in_training_val_chunks": 16,
                      "in_training_train_chunks": 8},
            "seeds": [43, 44], "variants": VARIANTS, "lr": {"sft": 1e-4, "ebft": 1e-4, "rlvr": 1e-4},
            "lr_source": "lr sweep", "sweep": {"lrs": [1e-5, 1e-4], "steps": 2, "seed": 43, "variants": ["sft"],
                                               "runs": sweep_runs},
            "models": planned,
            "eval": {"calibration": {"chunks": 32}, "profile": {"chunks": 8, "lengths": [1, 2, 4, 8, 16, 32]},
                     "downstream": {"limit": 20, "num_samples": 4, "max_new_tokens": 256},
                     "benchmarks": ["humaneval", "mbpp"], "mbpp_path": "/data/mbpp.jsonl",
                     "parts": ["calibration", "profile", "downstream"]},
            "train_common": ["experiment=repro_small"],
            "hardware": {"cpu": "Test CPU", "cores": 2, "gpu": "none", "python": "3.11", "torch": "2",
                         "transformers": "5", "lightning": "2", "os": "Linux"}}
    (out / PLAN).write_text(json.dumps(plan))
    return plan


def test_report_from_synthetic_runs(tmp_path):
    synthetic_output(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "| method | seeds | CE | FM | HumanEval greedy | HumanEval pass@1 | HumanEval pass@4 | MBPP greedy" in text
    sft_row = next(line for line in text.splitlines() if line.startswith("| SFT | 2 |"))
    assert "| 2.881 ± 0.001 |" in sft_row   # CE 2.880 and 2.882 (seeds 43, 44): mean ± s.d.
    assert "EBFT beat SFT?" in text
    # EBFT's per-unit values are SFT's minus 0.01 at both seeds: lower beyond noise, at every profile length
    ebft_vs_sft = text[text.index("### EBFT (α=1, γ=0.03, whitened) vs SFT"):text.index("### SFT vs Base")]
    assert "| FM | 0.4710 | 0.4810 | -0.0100 [-0.0100, -0.0100] | 0.0001 | 0.0000 | 24 | 43: -0.0100, 44: -0.0100" in ebft_vs_sft
    assert ebft_vs_sft.count("yes (lower)") == 2 + 6            # FM, CE and the six profile lengths
    assert "**In plain words:** EBFT (α=1, γ=0.03, whitened) was lower than SFT on FM, CE, FM G=1" in ebft_vs_sft
    assert "### RLVR vs" not in text                            # RLVR is only compared when asked for
    curves = text[text.index("## In-sample vs held-out"):]
    assert "| SFT | 2 | 16 | -0.0100 ± 0.0028 | -0.2000 ± 0.0071 | -1.2500 |" in curves
    assert (tmp_path / "cfm_curves.png").stat().st_size > 1000
    assert "## Diagnosis" not in text                           # EBFT won: nothing to diagnose
    assert "**chosen**" in text and "lr_sweep/sft/lr1e-4" in text
    assert "runs/ebft/lr1e-4-seed44" in text and "eval/calibration/call00/00-m" in text
    assert "**Status: complete.**" in text
    assert "Test CPU" in text and "python -m experiments.repro --lr-sweep" in text and "python evaluate.py part=" in text
    for png in ("fm_profile.png", "training_curves.png"):
        assert f"]({png})" in text and (tmp_path / png).stat().st_size > 1000
    with (tmp_path / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 7


def test_diagnosis_when_ebft_loses_states_the_curves_and_the_budget(tmp_path):
    # EBFT 0.01 above SFT on every unit; both runs' held-out CFM fell 0.01 (se 0.004 per run) over 16 chunks
    synthetic_output(tmp_path, shifts={**SHIFTS, "ebft": -0.01})
    text = write_report(tmp_path).read_text()
    assert "## Diagnosis" in text
    assert ("SFT in-sample -0.2000 ± 0.0071 (lower), held-out -0.0100 ± 0.0028 (lower); "
            "EBFT in-sample -0.1000 ± 0.0071 (lower), held-out -0.0100 ± 0.0028 (lower)") in text
    # rate 0 per 100 chunks, se 100 * hypot(0.0028, 0.0028) / 16 = 0.025; gap 0.01: 100 * 0.01 / 0.05 = 20 chunks
    assert "+0.0000 ± 0.0250 per 100 chunks" in text and "EBFT is +0.0100 above SFT" in text
    assert "two standard errors: -0.0500 to +0.0500 per 100 chunks" in text and "after about 20 more chunks" in text
    # EBFT's held-out CFM falls 0.05: rate -0.25 +- 0.025 per 100 chunks, beyond noise: 0.01 / 0.0025 = 4 chunks
    shutil.rmtree(tmp_path)
    synthetic_output(tmp_path, shifts={**SHIFTS, "ebft": -0.01}, val_change={"ebft": -0.05})
    text = write_report(tmp_path).read_text()
    assert "-0.2500 ± 0.0250 per 100 chunks" in text and "pass SFT after about 4 more chunks (3 to 5 within" in text
    # EBFT's held-out CFM rises 0.05: rate +0.375, even the favourable end (+0.325) does not fall
    shutil.rmtree(tmp_path)
    synthetic_output(tmp_path, shifts={**SHIFTS, "ebft": -0.01}, val_change={"ebft": 0.05})
    text = write_report(tmp_path).read_text()
    assert "EBFT raised held-out CFM beyond noise" in text and "(+0.3250 per 100 chunks) does not fall" in text
    # EBFT already below SFT (the default output, where the report shows no diagnosis): the finding says so
    shutil.rmtree(tmp_path)
    plan = synthetic_output(tmp_path)
    found = diagnose(tmp_path, plan, attach_results(plan["models"], {p: read_results(tmp_path, p) for p in PARTS}),
                     "ebft")
    assert any("EBFT is already -0.0100 below SFT" in f for f in found)


def test_report_before_any_evaluation(tmp_path):
    synthetic_output(tmp_path)
    shutil.rmtree(tmp_path / "eval")
    text = write_report(tmp_path).read_text()
    assert "| Base | 0 |" in text and "(not evaluated yet)" in text and "(no profile yet)" in text
    assert "**Status: in progress**" in text and "training runs finished: 6/6; models evaluated: calibration 0/7" in text
    assert (tmp_path / "training_curves.png").is_file()


def test_report_while_the_sweep_runs(tmp_path):
    plan = synthetic_output(tmp_path)
    plan["lr_source"] = "lr sweep, in progress: the config's lrs until it ends"
    (tmp_path / PLAN).write_text(json.dumps(plan))
    text = write_report(tmp_path).read_text()
    assert "The sweep is still running: no lr chosen yet." in text and "**chosen**" not in text
    assert "lr_sweep/sft/lr1e-4" in text


def test_report_only_without_a_plan_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m experiments.repro"):
        main(["--out", str(tmp_path), "--report-only"])


def test_dry_run_prints_every_command(tmp_path, capsys):
    assert main(["--quick", "--lr-sweep", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert sum("lr_sweep" in line for line in lines) == 0       # full-length sweep runs are the seed-43 runs
    assert sum(line.startswith("python train.py") and "/runs/" in line for line in lines) == 4 + 6
    assert sum(line.startswith("python evaluate.py") for line in lines) == 2
    assert not (tmp_path / PLAN).exists()


# ------------------------------------------------------------------------------- the whole pipeline

@pytest.mark.slow
def test_quick_pipeline_end_to_end_and_resume(tmp_path):
    cmd = [sys.executable, "-m", "experiments.repro", "--quick", "--lr-sweep", "--out", str(tmp_path)]
    if MBPP.is_file():
        cmd += ["--mbpp", str(MBPP)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "README.md").read_text()
    assert "| method | seeds | CE | FM |" in text and "### EBFT (α=1, γ=0.03, whitened) vs SFT" in text
    assert all(label in text for label in ("| Base |", "| SFT | 2 |", "| EBFT (α=1, γ=0.03, whitened) | 2 |",
                                           "| EBFT (α=1, γ=0.03) | 2 |"))
    assert "| FM |" in text and "## In-sample vs held-out" in text
    for png in ("fm_profile.png", "training_curves.png", "cfm_curves.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert not list((tmp_path / "runs").rglob("checkpoints")) and list((tmp_path / "runs").rglob("hf_model"))
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "running" not in again.stdout and "skipped" in again.stdout
