"""The paper's recipes (conf/experiment), the sweep presets (conf/sweep), a real multirun on the
CPU and its collection into one table (experiments.collect)."""

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from ebft.config import train_settings
from ebft.eval.calibration import fixed_subset
from tests.test_train import validate
from experiments.collect import collect, find_runs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
HAS_RLVR = (CONF / "method" / "rlvr.yaml").is_file()

# docs/authors_code.md, "Recipe per task": hub data, model, T / C / s / G, pooling.
QWEN, LLAMA = "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-1B"
TASKS = {
    "paper_qa_code": ("qa_code", "sjelassi/opencode-instruct_100k_200tok", QWEN, (1024, 8, 8, 8), "last_token"),
    "paper_unstructured_code": ("unstructured_code", "sjelassi/swallow_code_20m", QWEN, (1024, 8, 8, 8), "last_token"),
    "paper_translation": ("translation", "sjelassi/alma", LLAMA, (1024, 4, 2, 4), "mean"),
}


def make(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)
    if not hydra:
        with open_dict(cfg):
            cfg.output_dir = "unused"
    return cfg


def sweep_jobs(cfg) -> list[dict[str, str]]:
    """The jobs Hydra's basic sweeper makes from ``hydra.sweeper.params``, each as {key: value}."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return [dict(o.split("=", 1) for o in job) for batch in batches for job in batch]


@pytest.mark.parametrize("experiment", sorted(TASKS))
def test_experiment_sets_the_paper_recipe_for_ebft(experiment):
    task, dataset, model, geometry, pooling = TASKS[experiment]
    cfg = make(f"experiment={experiment}")
    assert (cfg.task.name, cfg.data.kind, cfg.data.name, cfg.model.name) == (task, "hub", dataset, model)
    t = cfg.task
    assert (t.seq_len, t.context_len, t.stride, t.gen_len) == geometry
    assert t.pooling == pooling and cfg.feature_network.pooling == pooling
    m = cfg.method
    assert m.name == "ebft" and m.num_samples == 4 and m.temperature == 0.6 and m.top_p == 1.0
    assert (m.lr, m.schedule, m.warmup_ratio, list(m.betas), m.weight_decay) == (1e-6, "constant", 0.03, [0.9, 0.95], 0)
    assert m.whitening == "reference" and list(cfg.feature_network.layers) == [0.25, 0.5, 0.75]
    assert m.gradient_checkpointing is True
    # rollout batch 16 chunks x 4 samples = 64 rollouts per optimizer step; 2 epochs from the base model
    assert cfg.global_batch == 16 and cfg.trainer.max_epochs == 2 and cfg.trainer.max_steps == -1
    assert cfg.seed == 43 and cfg.data.val_size == 1000 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.alpha == 1.0 and cfg.init_from is None


@pytest.mark.parametrize("experiment", sorted(TASKS))
def test_method_sft_gives_the_warm_start_recipe(experiment):
    cfg = make(f"experiment={experiment}", "method=sft")
    m = cfg.method
    assert m.name == "sft" and (m.lr, m.schedule, m.min_lr_ratio, m.warmup_ratio) == (1e-5, "cosine", 0.1, 0.03)
    assert cfg.global_batch == 64 and cfg.trainer.max_epochs == 1
    assert cfg.task.seq_len == 1024 and cfg.model.name == TASKS[experiment][2]
    assert "num_samples" not in m and "temperature" not in m  # no EBFT knob leaks into SFT


@pytest.mark.skipif(not HAS_RLVR, reason="conf/method/rlvr.yaml is not there yet")
@pytest.mark.parametrize("experiment,rollout_batch", [("paper_qa_code", 32), ("paper_translation", 128)])
def test_method_rlvr_gives_the_table_5_recipe(experiment, rollout_batch):
    cfg = make(f"experiment={experiment}", "method=rlvr")
    m = cfg.method
    assert (m.name, m.lr, m.temperature, m.num_samples, m.max_new_tokens) == ("rlvr", 1e-6, 1.0, 8, 1024)
    assert cfg.global_batch == rollout_batch and cfg.trainer.max_epochs == 1


@pytest.mark.parametrize("experiment", sorted(TASKS))
def test_in_training_cfm_is_bounded_however_long_the_held_out_rows(experiment):
    """Validation runs before the first optimizer step and every 50, and CFM samples n completions per
    context (several times the cost of CE per chunk): on a fixed subset of at most 256 held-out chunks. A
    held-out row of unstructured code is a whole source file, so its 1k rows are thousands of chunks (about
    3,900 for files of the standard library's sizes); the 1k rows of the other tasks fill fewer than 256."""
    settings = train_settings(make(f"experiment={experiment}"))
    assert len(fixed_subset(3900, settings.eval.calibration.cfm_chunks, settings.seed)) == 256


@pytest.mark.parametrize("method", ["ebft", "sft"])
def test_experiment_passes_validation_on_a_tiny_stand_in(method):
    cfg = make("experiment=paper_qa_code", f"method={method}", "model=tiny", "data=embedded")
    validate(cfg)


def test_paper_grid_is_the_18_runs_from_base():
    cfg = make("experiment=paper_qa_code", "sweep=paper_grid", hydra=True)
    jobs = sweep_jobs(cfg)
    combos = {(j["method.whitening"], float(j["gamma"]), float(j["alpha"])) for j in jobs}
    assert len(jobs) == 18
    assert combos == set(itertools.product(["reference", "none"], [0, 0.03, 0.1], [0, 0.5, 1]))
    assert cfg.method.name == "ebft" and cfg.trainer.max_epochs == 2
    # every job composes: its keys exist in the EBFT config
    one = make("experiment=paper_qa_code", "sweep=paper_grid", *(f"{k}={v}" for k, v in jobs[-1].items()))
    assert (one.method.whitening, one.gamma, one.alpha) == ("none", 0.1, 1)


def test_paper_grid_warm_is_the_9_runs_from_the_warm_start(tmp_path):
    cfg = make("experiment=paper_translation", "sweep=paper_grid_warm", f"init_from={tmp_path}", hydra=True)
    jobs = sweep_jobs(cfg)
    assert len(jobs) == 9 and {"gamma", "alpha"} == set(jobs[0])
    assert cfg.method.whitening == "reference" and cfg.trainer.max_epochs == 1
    assert cfg.init_from == str(tmp_path) and cfg.model.name == LLAMA


def test_paper_grid_warm_refuses_to_run_without_init_from(monkeypatch):
    monkeypatch.delenv("EBFT_INIT_FROM", raising=False)
    cfg = make("experiment=paper_qa_code", "sweep=paper_grid_warm", "model=tiny", "data=embedded")
    with pytest.raises(Exception, match="EBFT_INIT_FROM"):
        validate(cfg)


def test_sft_baseline_sweep_is_table_4():
    cfg = make("experiment=paper_qa_code", "sweep=paper_sft_baseline", hydra=True)
    jobs = sweep_jobs(cfg)
    assert cfg.method.name == "sft" and cfg.trainer.max_epochs == 5 and len(jobs) == 4
    pairs = set()
    for job in jobs:
        run = make("experiment=paper_qa_code", "sweep=paper_sft_baseline", *(f"{k}={v}" for k, v in job.items()))
        pairs.add((run.global_batch, run.method.lr, run.method.schedule))
    assert pairs == {(b, lr, s) for b in (64, 128) for lr, s in ((5e-6, "constant"), (1e-5, "cosine"))}


# ---------------------------------------------------------------------------------- collector
def write_run(directory: Path, overrides: list[str], rows: list[dict]) -> None:
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    keys = sorted({k for r in rows for k in r})
    with open(directory / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_collect_keeps_last_values_and_varying_overrides(tmp_path):
    write_run(tmp_path / "0_alpha=0", ["task=qa_code", "alpha=0"], [
        {"step": 0, "val/ce": 3.0, "val/cfm": 0.6}, {"step": 0, "train/reward": 0.1},
        {"step": 1, "train/reward": 0.3}, {"step": 2, "val/ce": 2.5, "val/cfm": 0.5}])
    write_run(tmp_path / "1_alpha=1", ["task=qa_code", "alpha=1"], [
        {"step": 0, "val/ce": 3.0}, {"step": 0, "train/reward": 0.2}])
    text = collect(tmp_path)
    assert "shared overrides: task=qa_code" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| job | alpha | val/ce | val/cfm | train/reward | steps |"
    assert lines[1] == "| 0 | 0 | 2.5000 | 0.5000 | 0.3000 | 2 |"
    assert lines[2] == "| 1 | 1 | 3.0000 | – | 0.2000 | 1 |"
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["val/cfm"] for r in rows] == ["0.5000", ""]
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_collect_explains_an_empty_dir(tmp_path):
    with pytest.raises(SystemExit, match="metrics.csv"):
        collect(tmp_path)


# ------------------------------------------------------------------- a real multirun on the CPU
SMALL = ["model=tiny", "data.limit=300", "data.val_size=40", "task.seq_len=32", "method.batch_size=2",
         "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"]


def test_multirun_grid_runs_and_collects(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "task=qa_code", "method=ebft", "alpha=0,1", "gamma=0,0.1",
           "trainer.max_steps=1", *SMALL, "eval.cfm_chunks=1", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = find_runs(sweep)
    assert len(runs) == 4
    for run in runs:
        assert (run.path / "hf_model" / "config.json").is_file()
        assert run.steps == 1 and run.last("train/reward") is not None
        assert run.last("val/ce") is not None and run.last("val/cfm") is not None
    grid = {(r.overrides["alpha"], r.overrides["gamma"]) for r in runs}
    assert grid == {("0", "0"), ("0", "0.1"), ("1", "0"), ("1", "0.1")}
    printed = subprocess.run([sys.executable, "-m", "experiments.collect", str(sweep)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    table = [line for line in printed.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| job | alpha | gamma | val/ce | val/cfm | train/reward | steps |")
    assert len(table) == 1 + 4  # header + one row per run
    assert (sweep / "curves.png").is_file() and (sweep / "summary.csv").is_file()
