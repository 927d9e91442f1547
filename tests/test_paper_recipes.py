"""Every paper recipe rehearsed: one optimizer step of each ``experiment=paper_*`` x ``method`` and of
the first job of each sweep file, through ``train.py``'s code path, keeping everything the recipe sets.

What is kept: the composed recipe, with every key it sets (T = 1024 and C / s / G, pooling,
whitening, alpha / gamma, learning-rate schedule, ``global_batch`` and the micro-batch and
gradient accumulation it gives, gradient checkpointing, the strategy as it resolves on one CPU
process, ``num_samples``, ``max_new_tokens``, ...). What is replaced:

- the model: ``model.name=tiny:<the recipe's hub id>``, that model's family at a tiny shape with
  random weights and the real (SmolLM2) tokenizer (``ebft.models.architectures``);
- the data: a stand-in for the recipe's hub dataset, with that dataset's columns (those its preset
  in ``ebft.data.sources.PRESETS`` maps, so the mapping is exercised) holding rows of the embedded
  corpus of the task. The recipe keeps ``data=hub`` and its ``data.name``: the stand-in is a folder
  named like the hub id (``sjelassi/alma/data/train-00000-of-00001.parquet``) in the working
  directory, which ``datasets.load_dataset("sjelassi/alma")`` reads before it would ask the hub, and
  ``HF_HUB_OFFLINE=1`` keeps the hub from being probed. (A snapshot in a temporary Hugging Face cache
  does not work: offline, ``datasets`` reads only datasets it prepared itself, in its own cache
  layout. ``data=local data.files=<copy>``, which keeps the experiment's ``data.name`` and so its
  preset, is what docs/cluster.md gives users.)

What is limited, because it only makes the rehearsal short and is not the recipe's training:
``trainer.max_steps=1`` and the size of validation (``data.val_size``, ``trainer.limit_val_batches``,
``eval.cfm_chunks``, ``eval.cfm_train_chunks``).

Every case (recipes and sweep jobs) composes, sets only keys that its config groups define (a key
renamed in a recipe file would otherwise be ignored silently) and passes ``train.py``'s checks: fast.
The one-step runs assert one optimizer step (``global_step == 1``) made of the recipe's
``global_batch / method.batch_size`` micro-batches, and a finite loss. A step costs what the recipe's
batch costs through a 49k-token vocabulary, so the default suite runs the cheapest step of each
experiment file, SFT's (``FAST``: 35-70 s each), and the others are ``slow``
(``python -m pytest -m slow tests/test_paper_recipes.py``; EBFT 105-195 s, a sweep's first job 45-110 s,
RLVR on translation over 15 min).
The steps run on one intra-op thread: on a 2-core machine shared with another job, two threads made
every small operation wait for the busy core (translation's SFT case: 127 s with two, 35 s with one).
The sweep cases take the first job Hydra's basic sweeper makes from the sweep file's
``hydra.sweeper.params`` (``tests.test_experiments.sweep_jobs``); ``paper_grid_warm`` starts from the
SFT rehearsal's run.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from ebft.app import run as run_module
from ebft.config import DataConfigError
from ebft.data.embedded import embedded_rows
from ebft.data.sources import PRESETS
from tests.test_experiments import TASKS, make, sweep_jobs
from tests.test_train import make_cfg, train, train_losses, validate

EXPERIMENTS = sorted(TASKS)
SWEEP_EXPERIMENT = "paper_qa_code"   # the experiment the docs run the sweeps with
SWEEPS = ("paper_grid", "paper_sft_baseline", "paper_grid_warm")
LIMITS = ["trainer.max_steps=1", "data.val_size=40", "trainer.limit_val_batches=1", "eval.cfm_chunks=1",
          "eval.cfm_train_chunks=1", "trainer.enable_progress_bar=false"]
LOSS_KEY = {"sft": "train/ce", "ebft": "train/loss", "rlvr": "train/loss"}
FAST = {("paper_qa_code", "sft"), ("paper_translation", "sft"), ("paper_unstructured_code", "sft")}
# Recipes that cannot run, expected to fail in seconds (so in the default suite, to be seen)
BROKEN = {("paper_qa_code", "rlvr"): (
    "the recipe's Q&A dataset has no unit tests (its preset maps question and answer only), so RLVR has no "
    "prompt to reward; once it has, this case runs RLVR's whole step (minutes): mark it slow")}

# hub id -> (the embedded corpus of its rows, how many, one embedded row -> the hub dataset's columns)
STAND_INS = {
    "sjelassi/opencode-instruct_100k_200tok": (
        "qa_code", 700, lambda r: {"question": r["question"], "answer": r["answer"]}),
    "sjelassi/swallow_code_20m": ("unstructured_code", 150, lambda r: {"text": r["answer"]}),
    "sjelassi/alma": ("translation", 2200, lambda r: {"question": r["question"], "answer": r["answer"],
                                                      "source-target": f"{r['source_lang']}-{r['target_lang']}"}),
}


def write_stand_in(root: Path, name: str) -> Path:
    """The stand-in of hub dataset ``name``, written where a copy of its hub repository has its data:
    ``root/<hub id>/data/train-00000-of-00001.parquet`` (returned)."""
    task, count, columns = STAND_INS[name]
    frame = pd.DataFrame([columns(r) for r in embedded_rows(task)[:count]])
    assert set(frame.columns) == {c for c in PRESETS[name].fields.values() if c}, "the stand-in has the preset's columns"
    path = root / name / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    frame.to_parquet(path)
    return path


def recipe_cases() -> list[tuple[str, str]]:
    """(experiment, method) of every paper recipe: RLVR where the task has a verifier."""
    return [(e, m) for e in EXPERIMENTS for m in ("ebft", "sft", "rlvr")
            if m != "rlvr" or make(f"experiment={e}").task.verifiable]


def first_job(*overrides: str) -> list[str]:
    """The overrides of the first job Hydra's basic sweeper runs for ``overrides`` (which name a sweep)."""
    return [f"{k}={v}" for k, v in sweep_jobs(make(*overrides, hydra=True))[0].items()]


def sweep_case(sweep: str, init_from: Path) -> list[str]:
    """The first job of ``sweep`` with the docs' experiment; the warm grid starts from ``init_from``."""
    base = [f"experiment={SWEEP_EXPERIMENT}", f"sweep={sweep}"]
    if sweep == "paper_grid_warm":
        base.append(f"init_from={init_from}")
    return [*base, *first_job(*base)]


def rehearsal(*overrides: str) -> list[str]:
    """The overrides of a rehearsal: ``overrides`` (a recipe), its model's family at the tiny shape, the limits."""
    return [*overrides, f"model.name=tiny:{make(*overrides).model.name}", *LIMITS]


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def undefined_keys(*overrides: str) -> list[str]:
    """Keys of the composed ``overrides`` that the config groups they choose (task, method, model, ...)
    do not define: set by an experiment or sweep file, they would reach no code."""
    choices = make(*overrides, hydra=True).hydra.runtime.choices
    groups = [f"{g}={o}" for g, o in choices.items() if o is not None and "/" not in g and g not in ("experiment", "sweep")]
    keys = set(_leaves(OmegaConf.to_container(make(*overrides))))
    return sorted(keys - set(_leaves(OmegaConf.to_container(make(*groups)))))


CASES = [pytest.param(["experiment=" + e, "method=" + m], id=f"{e}-{m}") for e, m in recipe_cases()]


@pytest.mark.parametrize("case", [*CASES, *(pytest.param(s, id=s) for s in SWEEPS)])
def test_every_case_composes_with_known_keys_and_passes_the_checks(case, tmp_path):
    overrides = sweep_case(case, tmp_path) if isinstance(case, str) else case
    undefined = undefined_keys(*overrides)
    assert not undefined, f"keys that no config group defines (a typo in a recipe file?): {undefined}"
    validate(make_cfg(tmp_path / "run", *rehearsal(*overrides), base=[]))


class MicroBatches(Callback):
    """Counts the training micro-batches and reads the trainer's gradient accumulation."""

    def __init__(self):
        self.count, self.accumulate = 0, None

    def on_train_batch_end(self, trainer, *args):
        self.count += 1
        self.accumulate = trainer.accumulate_grad_batches


@pytest.fixture(scope="module")
def rehearse(tmp_path_factory):
    """``rehearse(*overrides) -> run dir``: one optimizer step of a recipe on the stand-ins (each run once)."""
    root = tmp_path_factory.mktemp("hub")
    for name in STAND_INS:
        write_stand_in(root, name)
    runs: dict[tuple[str, ...], Path] = {}
    number = itertools.count()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(*overrides: str) -> Path:
        if overrides in runs:
            return runs[overrides]
        output = root / "runs" / str(next(number))
        cfg = make_cfg(output, *rehearsal(*overrides), base=[])
        counter = MicroBatches()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            mp.setenv("HF_HUB_OFFLINE", "1")
            original = run_module.build_trainer
            mp.setattr(run_module, "build_trainer", lambda settings, out, cbs: original(settings, out, [*cbs, counter]))
            summary = train(cfg)
        micro_batches = cfg.global_batch // cfg.method.batch_size
        assert summary["steps"] == 1
        assert counter.count == counter.accumulate == micro_batches, (counter.count, counter.accumulate, micro_batches)
        losses = train_losses(output, LOSS_KEY[cfg.method.name])
        assert list(losses) == [0] and math.isfinite(losses[0]), losses
        runs[overrides] = output
        return output

    yield run
    torch.set_num_threads(threads)


def _step_param(experiment: str, method: str):
    marks = [] if (experiment, method) in FAST | set(BROKEN) else [pytest.mark.slow]
    if (experiment, method) in BROKEN:
        marks.append(pytest.mark.xfail(strict=True, raises=DataConfigError, reason=BROKEN[experiment, method]))
    return pytest.param(experiment, method, marks=marks, id=f"{experiment}-{method}")


def test_the_fast_cases_cover_every_experiment_file():
    assert {e for e, _ in FAST} == set(EXPERIMENTS) and FAST | set(BROKEN) <= set(recipe_cases())


@pytest.mark.parametrize("experiment,method", [_step_param(e, m) for e, m in recipe_cases()])
def test_recipe_runs_one_step(rehearse, experiment, method):
    rehearse(f"experiment={experiment}", f"method={method}")


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_first_job_runs_one_step(rehearse, sweep):
    sft = rehearse(f"experiment={SWEEP_EXPERIMENT}", "method=sft") if sweep == "paper_grid_warm" else None
    rehearse(*sweep_case(sweep, sft))
