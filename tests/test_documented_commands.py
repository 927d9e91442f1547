"""Every ``python train.py`` / ``python evaluate.py`` / ``python -m experiments...`` command that
README.md and docs/*.md show runs as written, with the tiny model and minimal steps and limits
appended.

Commands are parsed from the files (fenced blocks, line continuations joined, comments dropped; and
inline code spans), so a command added to the docs is covered without editing this test. Each runs
in a scratch working directory (where its relative paths such as ``outputs/...`` resolve) after the
runs its placeholders name (``<run>``, ``<SFT run dir>``, ...) were trained there. Commands that
need something this machine cannot have (a GPU, a model hub, Slurm, a COMET environment) are listed
in ``UNAVAILABLE`` with the reason, and the test checks the list stays exact: a command in it must
still be documented, and it is the only way a documented command escapes running.

Recipes at the paper's geometry (``experiment=paper_*``: T = 1024), multiruns and the experiment
drivers are ``slow``; the rest runs in the default suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_paper_recipes import write_stand_in

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("python train.py", "python evaluate.py", "python -m experiments.")

# What a command needs that this machine does not have: (a piece of the command, the reason).
UNAVAILABLE = (
    ("trainer.accelerator=gpu", "needs a GPU"),
    ("trainer.devices=4", "needs 4 GPUs"),
    ("data=hub", "needs a model/data hub"),
    ("hub.push=true", "needs a model hub and a token"),
    ("eval.comet_python=", "needs a Python with unbabel-comet"),
    ("hydra/launcher=slurm", "needs Slurm (its --cfg form, which only prints, runs)"),
)

# Appended to every command of a program: the tiny model, one step, small data and limits.
TRAIN_MINIMAL = ["model=tiny", "trainer.max_steps=1", "data.limit=240", "data.val_size=24",
                 "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "eval.cfm_chunks=2",
                 "eval.cfm_train_chunks=2"]
EVAL_MINIMAL = ["model=tiny", "limit=1", "num_samples=1", "max_new_tokens=16", "data.limit=240", "data.val_size=24",
                "eval.profile_lengths=[1,2]", "eval.reward.prompts=1", "eval.reward.num_samples=2",
                "eval.reward.max_new_tokens=16"]
EXPERIMENT_MINIMAL = {"experiments.repro": ["--quick", "--out", "repro_quick"],
                      "experiments.synthetic": ["--quick", "--runs", "synthetic_runs", "--out", "synthetic_report"],
                      "experiments.collect": []}

MBPP = os.environ.get("EBFT_MBPP", "")
QA_HUB = "sjelassi/opencode-instruct_100k_200tok"   # the Q&A recipe's dataset: a copy of it for the rehearsal
# Placeholders of the docs -> what the scratch directory holds (see ``workspace``).
RUNS = {"sft": "outputs/qa_code/sft/run", "ebft": "outputs/qa_code/ebft/run", "rlvr": "outputs/qa_code/rlvr/run"}
PLACEHOLDERS = {
    "outputs/qa_code/ebft/<run>": RUNS["ebft"], "outputs/qa_code/sft/<run>": RUNS["sft"],
    "outputs/qa_code/rlvr/<run>": RUNS["rlvr"], "<run>": RUNS["ebft"], "<run dir>": RUNS["ebft"],
    "<run a>": RUNS["sft"], "<run b>": RUNS["ebft"], "<SFT run dir>": RUNS["sft"], "<base>": "tiny",
    "<sft run>": RUNS["sft"], "<ebft run>": RUNS["ebft"], "<rlvr run>": RUNS["rlvr"],
    "<the same overrides>": "", "/path/to/hf_dir": RUNS["sft"] + "/hf_model",
    "multirun/qa_code/<date>": "multirun/qa_code/sweep", "multirun/qa_code/<time>": "multirun/qa_code/sweep",
    "<sweep dir>": "multirun/qa_code/sweep", "<your copy of mbpp.jsonl>": MBPP, "<mbpp.jsonl>": MBPP,
    "<your copy>.parquet": f"{QA_HUB}/data/train-00000-of-00001.parquet",
}


@dataclass(frozen=True)
class Command:
    text: str       # as documented (continuations joined, comment dropped)
    where: str      # file:line

    @property
    def slow(self) -> bool:
        return bool(re.search(r"experiment=paper_|\s-m\s|experiments\.(repro|synthetic)|trainer=ddp", self.text))

    @property
    def unavailable(self) -> str | None:
        return next((why for piece, why in UNAVAILABLE if piece in self.text and "--cfg" not in self.text), None)


def _commands_in(text: str) -> list[tuple[str, int]]:
    """(command, line) for every documented command of ``text``: lines of fenced blocks that start
    with one (or continue one after ``&&``), and inline code spans that are one."""
    found, fenced = [], []
    lines = text.splitlines()
    inside, i = False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            start, joined = i, line
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined.rstrip()[:-1] + " " + lines[i].strip()
            for part in joined.split("&&"):
                part = " ".join(re.sub(r"\s#\s.*$", "", part).split())
                if part.startswith(PROGRAMS):
                    found.append((part, start + 1))
            fenced.append(range(start, i + 1))
        i += 1
    prose = "\n".join("" if any(n in r for r in fenced) or lines[n].lstrip().startswith("```") else lines[n]
                      for n in range(len(lines)))
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if span.startswith(PROGRAMS) and not span.startswith("python -m experiments.repro:"):
            found.append((span, prose.count("\n", 0, m.start()) + 1))
    return found


def documented_commands() -> list[Command]:
    """Each distinct documented command once, with where it first appears."""
    seen: dict[str, Command] = {}
    for path in DOCS:
        for text, line in _commands_in(path.read_text()):
            seen.setdefault(text, Command(text, f"{path.relative_to(ROOT)}:{line}"))
    return list(seen.values())


def argv_for(command: Command, workdir: Path) -> list[str]:
    """The command with placeholders filled and the minimal settings of its program appended."""
    text = command.text
    for placeholder in sorted(PLACEHOLDERS, key=len, reverse=True):
        text = text.replace(placeholder, PLACEHOLDERS[placeholder])
    args = shlex.split(text)
    assert args[0] == "python", command
    if args[1] == "-m":
        return [sys.executable, *args[1:], *EXPERIMENT_MINIMAL[args[2]]]
    script, rest = args[1], args[2:]
    minimal = TRAIN_MINIMAL if script == "train.py" else EVAL_MINIMAL
    if "--cfg" in rest:
        minimal = []
    elif "-m" in rest:
        minimal = [*minimal, f"hydra.sweep.dir=sweeps/{_slug(command.text)}"]
    elif not any(a.startswith("hydra.run.dir=") for a in rest):
        minimal = [*minimal, f"hydra.run.dir=runs/{_slug(command.text)}"]
    return [sys.executable, str(ROOT / script), *rest, *minimal]


def _slug(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch working directory holding what the docs' placeholders name: a tiny SFT, EBFT and
    RLVR run, a two-job sweep, and the data files the examples read."""
    work = tmp_path_factory.mktemp("documented")
    write_stand_in(work, QA_HUB)
    rows = [{"prompt": f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n", "completion": f"    return x + {i}\n"}
            for i in range(300)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pandas as pd
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in rows]
    pd.DataFrame(chats).to_parquet(work / "chats.parquet")
    for method, out in RUNS.items():
        done = _run([sys.executable, str(ROOT / "train.py"), f"method={method}", *TRAIN_MINIMAL,
                     f"hydra.run.dir={out}"], work)
        assert done.returncode == 0, done.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def sweep(workspace) -> Path:
    """A two-job multirun for the commands that read a sweep directory."""
    done = _run([sys.executable, str(ROOT / "train.py"), "-m", "alpha=0,1", *TRAIN_MINIMAL,
                 "hydra.sweep.dir=multirun/qa_code/sweep"], workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    return workspace / "multirun/qa_code/sweep"


COMMANDS = documented_commands()


def _param(c: Command):
    marks = [pytest.mark.slow] if c.slow else []
    if c.unavailable:
        marks.append(pytest.mark.skip(reason=c.unavailable))
    return pytest.param(c, marks=marks, id=f"{c.where} {c.text[:60]}")


def test_the_docs_show_commands():
    """The parser finds the commands (guards against a parser that silently finds none)."""
    texts = [c.text for c in COMMANDS]
    assert "python train.py" in texts
    assert "python train.py method=rlvr method.max_new_tokens=128 trainer.max_steps=2" in texts
    assert any(t.startswith("python evaluate.py 'metrics=[reward]'") and t.endswith("eval.reward.num_samples=4")
               for t in texts), texts
    assert any(t.startswith("python -m experiments.collect") for t in texts)
    assert not [t for t in texts if " # " in t or t.endswith("\\")]


def test_every_unavailable_entry_is_documented():
    """An entry of ``UNAVAILABLE`` that no documented command needs any more is stale."""
    for piece, why in UNAVAILABLE:
        assert any(piece in c.text for c in COMMANDS), f"{piece!r} ({why}) is in no documented command"


@pytest.mark.parametrize("command", [_param(c) for c in COMMANDS])
def test_documented_command_runs(command: Command, workspace, request):
    if "<sweep dir>" in command.text or "multirun/qa_code/<" in command.text:
        request.getfixturevalue("sweep")
    if "mbpp.jsonl>" in command.text and not MBPP:
        pytest.skip("MBPP's mbpp.jsonl is not on this machine (set EBFT_MBPP)")
    done = _run(argv_for(command, workspace), workspace)
    assert done.returncode == 0, f"{command.where}: {command.text}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
