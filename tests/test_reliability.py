"""Bad cases a user runs into: each ends with a non-zero exit or one clear error naming the key, file or
line, and the results already on disk stay intact (tiny model, a few steps)."""

import csv
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ebft.app import run as run_module
from ebft.app import trainer as trainer_module
from ebft.config import ConfigError, DataConfigError
from ebft.data.sources import load_rows
from ebft.models.loading import ModelSourceError, build_tiny_model, load_model
from tests.test_train import Crash, CrashAt, make_cfg, train

ROOT = Path(__file__).resolve().parents[1]
CLI = ["model=tiny", "data.limit=300", "data.val_size=40", "task.seq_len=32", "method.batch_size=2",
       "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
       "eval.every_n_steps=0", "method=sft"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (but Hydra's logs) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.suffix != ".log" and ".hydra" not in p.parts}


def metric_steps(run: Path, key: str) -> list[int]:
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key)]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A finished 3-step SFT run (checkpoints every 2 steps)."""
    run = tmp_path_factory.mktemp("sft") / "run"
    train(make_cfg(run, "method=sft", "trainer.max_steps=3"))
    return run


# --------------------------------------------------------------------------- run directories


def test_last_step_has_a_checkpoint(sft_run):
    assert checkpoint(sft_run / "checkpoints" / "last.ckpt")["global_step"] == 3  # not 2, the last multiple of 2


def test_a_directory_holding_a_run_is_refused_then_resumed_in_place(sft_run, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(sft_run), str(run)], check=True)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=f"output_dir {run} already holds a run .*ckpt_path=last"):
        train(make_cfg(run, "method=sft", "trainer.max_steps=3"))
    assert snapshot(run) == before

    (run / "checkpoints" / "last.ckpt.tmp").write_bytes(b"half")  # a crash during an atomic write
    (run / "hf_model.tmp").mkdir()
    train(make_cfg(run, "method=sft", "trainer.max_steps=5", "ckpt_path=last"))
    assert metric_steps(run, "train/ce") == [0, 1, 2, 3, 4]           # the first run's rows kept, then appended
    assert checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert not (run / "checkpoints" / "last.ckpt.tmp").exists() and not (run / "hf_model.tmp").exists()


def test_other_tools_files_do_not_make_a_run_and_survive_a_failure(tmp_path):
    """A driver's record beside the run (e.g. the reproduction's job.json) is neither refused as an earlier
    run nor deleted with a failed run's empty directory."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text("{}")
    with pytest.raises(ConfigError, match="alpha"):
        train(make_cfg(run, "method=ebft", "alpha=2"))
    assert (run / "job.json").is_file()
    train(make_cfg(run, "method=sft", "trainer.max_steps=1"))
    assert (run / "metrics.csv").is_file() and (run / "job.json").is_file()


def test_a_crash_resumed_in_place_repeats_no_metric_row(tmp_path, monkeypatch):
    """Steps logged after the last checkpoint and before a crash are trained again on resume: their
    first rows go, so every step is in metrics.csv once."""
    run = tmp_path / "run"
    original = run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer", lambda settings, out, cbs: original(settings, out, [*cbs, CrashAt(3)]))
    with pytest.raises(Crash):
        train(make_cfg(run, "method=sft", "trainer.max_steps=5"))
    assert checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert metric_steps(run, "train/ce") == [0, 1, 2]       # step index 2 = the third step, after the checkpoint
    monkeypatch.setattr(run_module, "build_trainer", original)
    train(make_cfg(run, "method=sft", "trainer.max_steps=5", "ckpt_path=last"))
    assert metric_steps(run, "train/ce") == [0, 1, 2, 3, 4]
    assert metric_steps(run, "val/ce") == [0, 1, 3]            # as an uninterrupted 5-step run logs them


def test_a_run_without_a_checkpoint_says_delete_it_or_take_another_directory(tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer", lambda settings, out, cbs: original(settings, out, [*cbs, CrashAt(1)]))
    with pytest.raises(Crash):
        train(make_cfg(run, "method=sft", "trainer.max_steps=5"))
    monkeypatch.setattr(run_module, "build_trainer", original)
    assert (run / "metrics.csv").is_file() and not (run / "checkpoints" / "last.ckpt").exists()
    fix = f"holds a run that stopped before its first checkpoint .*rm -r {run}.*a new directory"
    for resume in ([], ["ckpt_path=last"]):      # reused or resumed: the same message, with both ways out
        with pytest.raises(ConfigError, match=fix):
            train(make_cfg(run, "method=sft", *resume))


def test_ckpt_path_last_without_a_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=last: .*last.ckpt does not exist; .*hydra.run.dir"):
        train(make_cfg(tmp_path / "new", "method=sft", "ckpt_path=last"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage,fragment", [
    ("empty", "is empty \\(0 bytes"),
    ("truncated", "is not a readable checkpoint, truncated or damaged"),
    ("other_method", "is a checkpoint of method.name=sft, not method.name=ebft: resume it with method=sft"),
])
def test_bad_checkpoints_are_named_before_any_model_loads(sft_run, tmp_path, damage, fragment):
    before = snapshot(sft_run)
    ckpt = tmp_path / "copy.ckpt"
    data = (sft_run / "checkpoints" / "last.ckpt").read_bytes()
    ckpt.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "other_method": data}[damage])
    method = "ebft" if damage == "other_method" else "sft"
    with pytest.raises(ConfigError, match=f"ckpt_path: {ckpt} {fragment}"):
        train(make_cfg(tmp_path / "resumed", f"method={method}", f"ckpt_path={ckpt}"))
    assert not (tmp_path / "resumed").exists()  # the failed run's empty directory is gone
    assert snapshot(sft_run) == before


# --------------------------------------------------------------------------- non-finite steps


class Poison(Callback):
    """Before optimizer step ``step``: a NaN gradient on one weight (``grad``, the loss stays finite) or
    NaN embeddings (``loss``)."""

    def __init__(self, step: int, what: str):
        self.step, self.what, self.handle = step, what, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step != self.step or self.handle is not None:
            return
        weight = module.generator.get_input_embeddings().weight
        if self.what == "grad":
            self.handle = weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        else:
            with torch.no_grad():
                weight.fill_(float("nan"))
            self.handle = True


@pytest.mark.parametrize("method,what", [("sft", "loss"), ("sft", "grad"), ("ebft", "grad"), ("rlvr", "grad")])
def test_a_non_finite_step_stops_before_any_weight_changes(tmp_path, monkeypatch, method, what):
    extra = [f"method={method}", "trainer.max_steps=4"]
    if method == "rlvr":
        extra += ["task=translation", "method.num_samples=4", "method.max_new_tokens=6"]
    original = run_module.build_trainer
    monkeypatch.setattr(run_module, "build_trainer", lambda settings, out, cbs: original(settings, out, [*cbs, Poison(2, what)]))
    with pytest.raises(FloatingPointError, match="non-finite training loss or gradient at step 2 .*no weight changed"):
        train(make_cfg(tmp_path, *extra))
    assert not (tmp_path / "hf_model").exists()
    saved = checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2 and not trainer_module.non_finite(saved["state_dict"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_non_finite_weights_are_never_written(tmp_path):
    state = {"w": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "step": torch.tensor(3)}
    assert trainer_module.non_finite(state) == ["b"]
    with pytest.raises(FloatingPointError, match="not writing checkpoint .*first: b"):
        trainer_module.AtomicCheckpointIO().save_checkpoint({"state_dict": state}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- files that cannot be read


@pytest.mark.parametrize("content,fragment", [
    (b"", "is empty; give a file with rows"),
    (b'{"question": "a", "answer": "b"}\n{"question": oops}\n', "line 2: not valid JSON \\(Expecting value at column 14\\)"),
    (b'{"question": "a", "answer": "b"}\n\n{"question": "\xff", "answer": "b"}\n', "line 3: not UTF-8 text \\(byte 0xff\\)"),
])
def test_data_files_that_cannot_be_read_name_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataConfigError, match=f"data.files: '{path}' {fragment}"):
        load_rows({"kind": "local", "files": str(path)}, "qa_code")


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_weights_name_the_file(tmp_path, damage):
    build_tiny_model(vocab_size=256, num_layers=2, hidden=32, seed=0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage!" * 4 + data[32:])
    with pytest.raises(ModelSourceError, match=f"{weights}: damaged or truncated weights"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- the command line


def test_cli_names_a_bad_number_and_leaves_no_directory(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", *CLI, "method=ebft", "alpha=abc", f"hydra.run.dir={run}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "train.py: alpha='abc' is not a number"
    assert not run.exists()


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *CLI, "trainer.max_steps=1000", f"hydra.run.dir={run}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert step >= 2 and f"train.py: SIGTERM at step {step}: saved {run / 'checkpoints' / 'last.ckpt'}" in err
    command = shlex.split(err.split("Resume with:\n")[1].splitlines()[0])
    assert command[:2] == ["python", "train.py"] and command[-2:] == [f"hydra.run.dir={run}", "ckpt_path=last"]
    overrides = [o for o in command[2:] if not o.startswith("hydra.run.dir=")]  # make_cfg sets the directory
    train(make_cfg(run, *overrides, f"trainer.max_steps={step + 1}", base=[]))
    assert metric_steps(run, "train/ce") == list(range(step + 1))
    assert (run / "hf_model" / "config.json").is_file()


# --------------------------------------------------------------------------- evaluations


def _hf_dir(path: Path, tokenizer, seed: int) -> Path:
    build_tiny_model(vocab_size=len(tokenizer), seed=seed).save_pretrained(path / "hf_model")
    tokenizer.save_pretrained(path / "hf_model")
    return path


class Counter:
    """Wraps ``owner.name`` and counts its calls; raises KeyboardInterrupt at call ``stop_at``."""

    def __init__(self, monkeypatch, owner, name: str, stop_at: int | None = None):
        self.calls, self.stop_at, original = 0, stop_at, getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self.stop_at:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)


def test_an_interrupted_evaluation_resumes_without_recomputing(tmp_path, monkeypatch, tokenizer):
    from ebft.eval import runner
    from ebft.eval.runner import CodeBenchmark, evaluate
    from tests.test_evaluate import make_settings as eval_cfg

    run = _hf_dir(tmp_path / "run", tokenizer, seed=1)
    request = [f"ckpt=[tiny,{run}]", "metrics=[ce,humaneval]", "num_samples=2", "limit=1"]
    with monkeypatch.context() as m:  # Ctrl-C during the second model's HumanEval
        Counter(m, CodeBenchmark, "run", stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            evaluate(eval_cfg(tmp_path / "eval" / "first", *request))
    calibrations, benchmarks = Counter(monkeypatch, runner, "calibrate"), Counter(monkeypatch, CodeBenchmark, "run")
    evaluate(eval_cfg(tmp_path / "eval" / "again", *request))  # the default run dirs differ by time stamp
    assert (calibrations.calls, benchmarks.calls) == (0, 1)  # only the second model's HumanEval was left
    monkeypatch.undo()
    evaluate(eval_cfg(tmp_path / "fresh" / "eval", *request))  # nothing to take over: all computed
    again, fresh = tmp_path / "eval" / "again", tmp_path / "fresh" / "eval"
    assert (again / "results.csv").read_text() == (fresh / "results.csv").read_text()
    for model_dir in ("00-tiny_base", f"01-{runner._slug(str(run))}"):
        resumed, computed = (json.loads((d / model_dir / "results.json").read_text()) for d in (again, fresh))
        resumed.pop("seconds"), computed.pop("seconds")
        assert resumed == computed


def test_a_corrupt_model_is_reported_failed_and_the_others_evaluated(tmp_path, monkeypatch, tokenizer, caplog):
    from ebft.eval import runner
    from ebft.eval.runner import evaluate
    from tests.test_evaluate import make_settings as eval_cfg

    broken, good = _hf_dir(tmp_path / "broken", tokenizer, seed=1), _hf_dir(tmp_path / "good", tokenizer, seed=2)
    weights = broken / "hf_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "eval"
    seen = []
    original = runner.calibrate
    monkeypatch.setattr(runner, "calibrate", lambda *a, **k: seen.append(
        any("cannot be evaluated" in r.getMessage() for r in caplog.records)) or original(*a, **k))
    with pytest.raises(ModelSourceError, match=f"1 of 3 models could not be evaluated .*ckpt={broken}: {weights}: "
                                               "damaged or truncated weights"):
        evaluate(eval_cfg(out, f"ckpt=[tiny,{broken},{good}]", "metrics=[ce]"))
    assert seen == [True, True]  # found before the first model was evaluated
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["tiny (base)", str(broken), str(good)]
    assert rows[1]["CE"] == "" and "damaged or truncated weights" in rows[1]["error"]
    assert float(rows[0]["CE"]) > 0 and float(rows[2]["CE"]) > 0 and rows[2]["error"] == ""


# --------------------------------------------------------------------------- one directory, one run


EVAL_CLI = ["model=tiny", "data.limit=300", "data.val_size=40", "task.seq_len=32", "metrics=[ce,cfm,profile]",
            "eval.profile_lengths=[1,2,4,8]"]


def _evaluate(cwd: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *EVAL_CLI, *overrides], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lock_held(directory: Path) -> bool:
    import fcntl
    try:
        with open(directory / ".lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True


def test_two_evaluations_started_together_keep_both_results(tmp_path):
    first, second = _evaluate(tmp_path, "limit=2"), _evaluate(tmp_path, "limit=2")
    for proc in (first, second):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "outputs" / "eval" / "qa_code").iterdir())
    assert len(runs) == 2 and all((r / "results.md").is_file() for r in runs)


def test_an_evaluation_in_progress_refuses_a_second_into_its_directory(tmp_path):
    out = tmp_path / "eval"
    first = _evaluate(tmp_path, f"hydra.run.dir={out}", "limit=16", "eval.cfm_num_samples=8")
    deadline = time.monotonic() + 300
    while not _lock_held(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    second = _evaluate(tmp_path, f"hydra.run.dir={out}", "limit=16", "eval.cfm_num_samples=8")
    _, err = second.communicate(timeout=600)
    assert first.poll() is None, "the first evaluation ended before the second started: make it longer"
    assert second.returncode == 1 and "Traceback" not in err
    assert f"evaluate.py: {out} is in use by evaluation pid {first.pid}" in err.strip().splitlines()[-1]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    results = json.loads(next(out.glob("00-*/results.json")).read_text())
    assert results["settings"]["limit"] == 16 and results["calibration"]["ce"] > 0


def test_a_training_run_in_progress_refuses_a_second_into_its_directory(tmp_path):
    from ebft.files import DirectoryBusy, directory_lock
    run = tmp_path / "run"
    with directory_lock(run, "training run"):
        with pytest.raises(DirectoryBusy, match=f"{run} is in use by training run pid \\d+: wait until it finishes"):
            train(make_cfg(run, "method=sft", "trainer.max_steps=1"))
        assert run.is_dir()                      # the busy directory is not removed as an empty failed run
    train(make_cfg(run, "method=sft", "trainer.max_steps=1"))
    assert (run / "metrics.csv").is_file()


def test_a_full_disk_is_one_line_naming_the_path_and_the_space(tmp_path, monkeypatch):
    import errno

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from ebft.files import DiskFull

    def no_space(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", no_space)
    run = tmp_path / "run"
    with pytest.raises(DiskFull) as err:
        train(make_cfg(run, "method=sft", "trainer.max_steps=2"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"no space left on the device writing {run / 'checkpoints' / 'last.ckpt'} "
                              "(it needs about ")
    assert "MiB free there: free space or write to another disk" in message
    assert not list(run.glob("checkpoints/*.tmp"))          # the partial file is cleaned up


def test_the_summary_names_only_what_exists(tmp_path, capsys):
    run = tmp_path / "run"
    train(make_cfg(run, "method=sft", "trainer.max_steps=0"))
    summary = capsys.readouterr().out.split("== run summary ==")[1]
    named = [line.split(": ", 1)[1].split(" (")[0] for line in summary.strip().splitlines()
             if line.startswith(("HF model:", "metrics:", "checkpoints:"))]
    assert named and all(Path(p).exists() for p in named), summary
