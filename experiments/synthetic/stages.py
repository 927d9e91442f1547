"""The driver's stages: each writes into its own folder and is skipped when its record is on disk.

A training run or an evaluation records the equivalent ``python train.py`` / ``python evaluate.py``
command line, its wall time and its CPU time (``run.json`` / ``test.json``); a record made by a
different command is an error, so changed settings never mix with old outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ebft.config import compose_config, evaluate_settings
from ebft.data.synthetic import process_from_config, save_symbol_tokenizer
from ebft.eval import report as eval_report
from ebft.eval.oracle import model_rollouts, oracle_errors
from ebft.eval.runner import evaluate
from ebft.files import atomic_path, write_json
from ebft.models.loading import build_tiny_model, load_model
from ebft.app.run import train
from ebft.config import train_settings

ROOT = Path(__file__).resolve().parents[2]


class DriverError(RuntimeError):
    """A stage that cannot go on; the message says why and what to do."""


@dataclass
class Settings:
    """The driver's settings (``synthetic`` section of the experiment, ``quick`` merged over it)."""

    cfg: DictConfig                  # the composed experiment (train.py's view of it)
    runs: Path                       # training runs and evaluations (large; not committed)
    out: Path                        # the report (small files)
    quick: bool = False
    extra: list[str] = field(default_factory=list)

    @property
    def s(self) -> DictConfig:
        return self.cfg.synthetic


def load_settings(runs: str | Path, out: str | Path, quick: bool = False, extra=()) -> Settings:
    cfg = compose_config("train", ["experiment=synthetic", *extra])
    if quick:
        q = cfg.synthetic.quick
        merged = OmegaConf.to_container(cfg.synthetic, resolve=True)
        merged["base"]["steps"] = q.base_steps
        merged["steps"], merged["seeds"] = q.steps, list(q.seeds)
        merged["lr_grid"] = OmegaConf.to_container(q.lr_grid)
        merged["variants"] = {k: v for k, v in merged["variants"].items() if k in q.variants}
        merged["test"].update(OmegaConf.to_container(q.test))
        merged["oracle"].update(OmegaConf.to_container(q.oracle))
        OmegaConf.set_struct(cfg, False)
        cfg.synthetic = merged
    return Settings(cfg, Path(runs).resolve(), Path(out).resolve(), quick, list(extra))


def composed(config: str, overrides) -> DictConfig:
    """``conf/<config>.yaml`` with ``overrides`` as the entry point would see it, without the Hydra node
    (a run in this process has no Hydra runtime; ``output_dir`` is given as an override)."""
    cfg = compose_config(config, list(overrides))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def relative(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (for commands in reports)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, data: dict) -> None:
    write_json(data, path, indent=1)


def _check_same(record: dict, command: str, directory: Path) -> None:
    if record["command"] != command:
        raise DriverError(f"{directory} holds a run of a different command:\n  was: {record['command']}\n"
                          f"  now: {command}\nuse another --runs folder, or delete that directory to rerun it")


@contextlib.contextmanager
def _logged(path: Path):
    """Send this process's stdout, stderr and logging to ``path`` while a stage runs."""
    root = logging.getLogger()
    with path.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        root.addHandler(handler)
        saved = [(h, h.level) for h in root.handlers if h is not handler]
        for h, _ in saved:
            h.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            root.removeHandler(handler)
            for h, level in saved:
                h.setLevel(level)


# --------------------------------------------------------------------------- init


def write_init(settings: Settings) -> Path:
    """The random initial model and the symbol tokenizer at ``model.name`` (kept when already there)."""
    cfg = settings.cfg
    target = Path(str(cfg.model.name))
    target = target if target.is_absolute() else ROOT / target
    if (target / "config.json").is_file():
        return target
    process = process_from_config(OmegaConf.to_container(cfg.data.process))
    with atomic_path(target) as tmp:
        tokenizer = save_symbol_tokenizer(process.vocab, tmp)
        init = cfg.model.init
        model = build_tiny_model(vocab_size=len(tokenizer), num_layers=int(init.layers), hidden=int(init.hidden),
                                 seed=int(init.seed))
        for key in ("eos_token_id", "pad_token_id"):
            setattr(model.config, key, tokenizer.eos_token_id)
            setattr(model.generation_config, key, tokenizer.eos_token_id)
        model.config.bos_token_id = model.generation_config.bos_token_id = None
        model.save_pretrained(tmp)
    return target


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Run:
    """One ``train.py`` run: its name, overrides (after ``experiment=synthetic``) and folder."""

    name: str
    overrides: tuple[str, ...]
    directory: Path

    @property
    def command(self) -> str:
        return shlex.join(["python", "train.py", "experiment=synthetic", *self.overrides,
                           f"hydra.run.dir={relative(self.directory)}"])


def train_run(run: Run, settings: Settings) -> dict:
    """Train ``run`` in this process through :func:`ebft.app.run.train` (what ``train.py`` calls) unless its
    record says it finished; drop the Lightning checkpoints afterwards; return the record."""
    record_path = run.directory / "run.json"
    record = _read(record_path)
    if record is not None:
        _check_same(record, run.command, run.directory)
        print(f"  {run.name}: done before ({record['seconds']:.0f} s), skipped", flush=True)
        return record
    shutil.rmtree(run.directory, ignore_errors=True)
    run.directory.mkdir(parents=True)
    cfg = composed("train", ["experiment=synthetic", *settings.extra, *run.overrides, f"output_dir={run.directory}"])
    print(f"  {run.name}: training ({relative(run.directory)})", flush=True)
    start, cpu = time.time(), time.process_time()
    with _logged(run.directory / "stdout.log"):
        summary = train(train_settings(cfg))
    record = {"name": run.name, "command": run.command, "steps": summary["steps"],
              "seconds": round(time.time() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
              "seconds_per_step": summary["seconds_per_step"]}
    shutil.rmtree(run.directory / "checkpoints", ignore_errors=True)
    _write(record_path, record)
    print(f"  {run.name}: {record['seconds']:.0f} s ({record['seconds_per_step']:.3f} s per step)", flush=True)
    return record


def curves(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """``val/ce`` and ``val/cfm`` over training from a run's ``metrics.csv``: ``{key: [(step, value)]}``."""
    import csv

    out: dict[str, dict[int, float]] = {"val/ce": {}, "val/cfm": {}}
    with (directory / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            for key in out:
                if row.get(key):
                    out[key][int(row["step"])] = float(row[key])
    return {k: sorted(v.items()) for k, v in out.items()}


# --------------------------------------------------------------------------- test evaluation


def eval_overrides(settings: Settings, base: Path, ckpt: Path, directory: Path) -> list[str]:
    """``evaluate.py`` overrides: the experiment's task, data, model and calibration settings, the test
    rows (a fresh ``data.seed``) and the base model as ``model.name`` (feature network and tokenizer)."""
    cfg, test = settings.cfg, settings.s.test
    e, phi = cfg.eval, cfg.feature_network
    process = ",".join(f"{k}:{v}" for k, v in OmegaConf.to_container(cfg.data.process).items())
    return ["task=synthetic", "data=synthetic", "model=synthetic_tiny", f"model.name={relative(base)}",
            f"ckpt={relative(ckpt)}", "metrics=[ce,cfm,profile]", f"seed={int(cfg.seed)}",
            f"data.process={{{process}}}", f"data.seed={int(test.data_seed)}", f"data.rows={int(test.rows)}",
            f"data.row_len={int(cfg.data.row_len)}", f"data.val_size={int(test.val_size)}",
            f"eval.cfm_chunks={int(test.chunks)}", f"eval.profile_chunks={int(test.profile_chunks)}",
            f"eval.cfm_num_samples={int(e.cfm_num_samples)}", f"eval.cfm_temperature={float(e.cfm_temperature)}",
            f"eval.whitening={e.whitening}", f"feature_network.layers=[{','.join(str(float(q)) for q in phi.layers)}]",
            f"feature_network.pooling={phi.pooling}",
            f"eval.profile_lengths=[{','.join(str(int(g)) for g in e.profile_lengths)}]",
            f"hydra.run.dir={relative(directory)}"]


def test_model(name: str, ckpt: Path, base: Path, settings: Settings) -> dict:
    """Held-out CE / CFM / FM profile (``evaluate.py``) and the oracle error of the model ``ckpt``
    (a run folder, or the base); written to ``<folder>/test`` (skipped when there)."""
    directory = (ckpt if ckpt != base else base.parent / "base_test").resolve()
    directory = directory / "test" if ckpt != base else directory
    overrides = eval_overrides(settings, base, ckpt, directory)
    command = shlex.join(["python", "evaluate.py", *overrides])
    record_path = directory / "test.json"
    record = _read(record_path)
    if record is not None:
        _check_same(record, command, directory)
        return record
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    print(f"  {name}: testing ({relative(directory)})", flush=True)
    start, cpu = time.time(), time.process_time()
    cfg = composed("evaluate", [o for o in overrides if not o.startswith("hydra.")] + [f"output_dir={directory}"])
    with _logged(directory / "stdout.log"):
        evaluate(evaluate_settings(cfg))
    units = json.loads(next(directory.glob(f"*/{eval_report.UNITS_FILE}")).read_text())
    result = json.loads(next(directory.glob(f"*/{eval_report.RESULTS_FILE}")).read_text())
    calibration_seconds = time.time() - start
    model = load_model(str(ckpt)).eval()
    oracle = oracle_of(model, settings)
    record = {"name": name, "command": command, "calibration": result["calibration"], "profile": result["profile"],
              "units": {"ce": units["ce"], "cfm": units["cfm"], "profile": units["profile"]}, "oracle": oracle,
              "seconds": round(time.time() - start, 1), "calibration_seconds": round(calibration_seconds, 1),
              "cpu_seconds": round(time.process_time() - cpu, 1)}
    _write(record_path, record)
    print(f"  {name}: {record['seconds']:.0f} s", flush=True)
    return record


def oracle_contexts(settings: Settings):
    """The process and the fixed held-out oracle contexts (symbol ids), drawn with ``oracle.seed``."""
    o = settings.s.oracle
    process = process_from_config(OmegaConf.to_container(settings.cfg.data.process))
    contexts, _ = process.sample(int(o.contexts), int(o.context_len), np.random.default_rng(int(o.seed)))
    return process, contexts


def _as_record(errors) -> dict:
    return {str(g): {stat: {"l2": np.round(e.l2, 8).tolist(), "tv": np.round(e.tv, 6).tolist()}
                     for stat, e in per.items()} for g, per in errors.items()}


def oracle_of(model, settings: Settings) -> dict:
    """Per-context oracle errors ``{G: {stat: {l2: [...], tv: [...]}}}`` of ``model``'s rollouts at
    temperature ``eval.cfm_temperature`` (token ids of the symbols are the symbol indices)."""
    o = settings.s.oracle
    process, contexts = oracle_contexts(settings)
    horizons = [int(g) for g in o.horizons]
    samples = model_rollouts(model, torch.from_numpy(contexts), int(o.rollouts), max(horizons),
                             float(settings.cfg.eval.cfm_temperature), seed=int(o.seed))
    return _as_record(oracle_errors(samples, process, contexts, horizons))


def oracle_of_truth(settings: Settings) -> dict:
    """The same errors for rollouts drawn from the process itself: l2 ~ 0, and the TV floor of the
    finite number of rollouts."""
    o = settings.s.oracle
    process, contexts = oracle_contexts(settings)
    horizons = [int(g) for g in o.horizons]
    samples = process.continue_from(process.filter(contexts), max(horizons), int(o.rollouts),
                                    np.random.default_rng(int(o.seed) + 1))
    return _as_record(oracle_errors(samples, process, contexts, horizons))
