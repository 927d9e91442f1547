"""Slurm and local launchers (hydra-submitit-launcher): the paper grid as Slurm jobs without
submitting anything, and a small part of it through submitit on this machine."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from experiments.collect import find_runs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_has_one_task_per_gpu(tmp_path):
    cfg = hydra_cfg("experiment=paper_qa_code", "sweep=paper_grid", "hydra/launcher=slurm", "trainer=ddp",
                    "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu",
                    "hydra.launcher.account=proj", f"hydra.sweep.dir={tmp_path}")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM
    assert launcher.tasks_per_node == 4 and launcher.nodes == 1
    assert list(launcher.setup) == [] and launcher.array_parallelism >= 27
    assert cfg.trainer.devices == "auto"  # Lightning counts the GPUs Slurm gives the task


def test_slurm_job_script_without_submitting(tmp_path, monkeypatch):
    """Render the sbatch script submitit would submit for one run of the grid (a fake srun on PATH
    lets submitit build its Slurm executor; nothing is submitted)."""
    import submitit

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{Path(sys.executable).parent}:/usr/bin:/bin")
    cfg = hydra_cfg("experiment=paper_qa_code", "sweep=paper_grid", "hydra/launcher=slurm",
                    "hydra.launcher.gpus_per_node=2", "hydra.launcher.partition=gpu",
                    "hydra.launcher.setup=[module load cuda]", "hydra.job.name=train",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    # the parameter mapping of hydra-submitit-launcher's launch(): generic keys as is, others slurm_*
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in generic else f"slurm_{k}": v for k, v in launcher.params.items()
              if k not in ("submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(folder=launcher.params["submitit_folder"], cluster="slurm")
    executor.update_parameters(**params)  # raises on any key submitit does not know
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--gpus-per-node=2", "--ntasks-per-node=2", "--partition=gpu", "--time=2880",
                 "--cpus-per-task=8", "--mem=128GB", "--job-name=train"):
        assert f"#SBATCH {line}" in script
    assert "module load cuda" in script


def test_cfg_hydra_shows_the_grid_and_the_slurm_settings():
    cmd = [sys.executable, "train.py", "experiment=paper_qa_code", "sweep=paper_grid", "hydra/launcher=slurm",
           "--cfg", "hydra"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"_target_: {SLURM}" in out
    for line in ("method.whitening: reference,none", "gamma: 0,0.03,0.1", "alpha: 0,0.5,1",
                 "tasks_per_node: ${.gpus_per_node}", "partition: null", "account: null"):
        assert line in out


def test_local_launcher_composes():
    launcher = hydra_cfg("hydra/launcher=local").hydra.launcher
    assert launcher._target_.endswith("LocalLauncher") and launcher.tasks_per_node == 1
    assert launcher.gpus_per_node == 0


@pytest.mark.slow
def test_two_runs_of_the_paper_grid_through_submitit_locally(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=paper_qa_code", "sweep=paper_grid", "hydra/launcher=local",
           "model=tiny", "data=embedded", "trainer.max_steps=1",
           # two of the 18 runs; CPU-sized data and geometry
           "method.whitening=reference", "gamma=0", "alpha=0,1",
           "data.limit=300", "data.val_size=40", "task.seq_len=32", "method.batch_size=1", "global_batch=1",
           "trainer.limit_val_batches=1", "eval.cfm_chunks=2", "method.gradient_checkpointing=false",
           "trainer.enable_progress_bar=false",
           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]  # short names: many overrides
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = find_runs(sweep)
    assert sorted(r.overrides["alpha"] for r in runs) == ["0", "1"]
    for run in runs:
        assert run.steps == 1 and (run.path / "hf_model" / "config.json").is_file()
    assert any((sweep / ".submitit").iterdir())
