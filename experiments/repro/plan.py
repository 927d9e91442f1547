"""The reproduction's jobs and its ``plan.json``.

Layout under the output folder (every number of the report comes from one of these directories):

- ``lr_sweep/<variant>/lr<lr>/``: the ``--lr-sweep`` runs (train.py run directories);
- ``runs/<variant>/lr<lr>-seed<seed>/``: the headline runs (metrics.csv, hf_model/, checkpoints/);
- ``eval/<part>/call<NN>/``: evaluate.py calls, one ``<NN>-<model>/results.json`` per model; a call
  evaluates every model still missing, so a resumed driver evaluates only those. Parts: ``calibration``
  (CE, CFM), ``profile`` (the FM profile, on fewer chunks: it samples up to 32 tokens per context) and
  ``downstream`` (the benchmarks);
- ``plan.json``: what was planned (models, seeds, lrs, sizes, hardware), read by the report.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from pathlib import Path, PurePosixPath

from ebft.files import write_json
from experiments.repro.jobs import Job, read_record
from experiments.repro.settings import ReproError, Settings, Variant, format_lr, merge_overrides, override_value

PLAN = "plan.json"
PARTS = ("calibration", "profile", "downstream")
"""Every evaluation part; a reproduction runs ``settings.parts`` (downstream only with --downstream)."""
RESULTS = "results.json"


# ----------------------------------------------------------------------------------- training

HYDRA_RUNTIME = ".hydra/hydra.yaml"
"""Hydra's record of the machine a run ran on (absolute paths, environment): removed after the run;
``.hydra/config.yaml`` and ``overrides.yaml`` say what ran."""


def run_key(variant: str, seed: int, lr: float) -> str:
    """A headline run's directory relative to the output folder (also its key in the report)."""
    return f"runs/{variant}/lr{format_lr(lr)}-seed{seed}"


def train_job(settings: Settings, name: str, variant: Variant, seed: int, lr: float, directory: Path,
              steps: int, interval: int, may_fail: bool = False) -> Job:
    """``python train.py`` for ``variant`` at ``seed`` and ``lr`` for ``steps`` optimizer steps.

    Its Lightning checkpoints (weights and optimizer state, ~1.6 GB for SmolLM2) are kept while it runs,
    so an interrupted run continues from the last one, and removed once it finished: evaluation reads
    ``hf_model/``.
    """
    run = [f"seed={seed}", f"method.lr={lr!r}", f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={interval}", f"hydra.run.dir={settings.path_arg(directory)}"]
    return Job(name, ("train.py", *merge_overrides(settings.train_common, variant.overrides, run)), directory,
               may_fail, discard=("checkpoints", HYDRA_RUNTIME), checkpoint="checkpoints/last.ckpt")


def sweep_is_headline(settings: Settings) -> bool:
    """Whether the sweep's runs are full headline runs (full length, at one of the seeds): then the run of
    the chosen lr is that seed's headline run, in the same directory, and is not trained again."""
    s = settings.sweep
    return int(s["steps"]) == settings.steps and int(s["seed"]) in settings.seeds


def sweep_entries(settings: Settings) -> list[dict]:
    """The lr-sweep runs: one per (swept variant, lr), each with its directory under the output folder."""
    seed, reuse = int(settings.sweep["seed"]), sweep_is_headline(settings)
    return [{"variant": name, "method": settings.variants[name].method, "lr": float(lr),
             "dir": run_key(name, seed, float(lr)) if reuse else f"lr_sweep/{name}/lr{format_lr(lr)}"}
            for name in settings.sweep["variants"] for lr in settings.sweep["lrs"]]


def sweep_jobs(settings: Settings) -> list[Job]:
    """The commands of :func:`sweep_entries`; a diverged run is a result, not an error. Full-length
    sweep runs validate on the headline schedule, so their command is the headline run's."""
    s = settings.sweep
    steps = int(s["steps"])
    interval = settings.val_interval if sweep_is_headline(settings) else steps
    return [train_job(settings, f"lr sweep {e['variant']} lr={format_lr(e['lr'])}", settings.variants[e["variant"]],
                      int(s["seed"]), e["lr"], settings.out / e["dir"], steps, interval, may_fail=True)
            for e in sweep_entries(settings)]


def models(settings: Settings, lrs: dict[str, float]) -> list[dict]:
    """The models of the comparison: the base model, then every variant at every seed."""
    out = [{"key": "base", "variant": "base", "label": "Base", "ckpt": settings.base_ckpt}]
    for name, variant in settings.variants.items():
        lr = lrs[variant.method]
        for seed in settings.seeds[:1] if name in settings.first_seed_only else settings.seeds:
            key = run_key(name, seed, lr)
            out.append({"key": key, "variant": name, "label": variant.label, "method": variant.method,
                        "seed": seed, "lr": lr, "dir": key, "ckpt": settings.path_arg(settings.out / key)})
    return out


def training_jobs(settings: Settings, planned: list[dict]) -> list[Job]:
    """The train.py command of every planned model but the base one."""
    return [train_job(settings, f"train {m['variant']} seed={m['seed']} lr={format_lr(m['lr'])}",
                      settings.variants[m["variant"]], m["seed"], m["lr"], settings.out / m["dir"], settings.steps,
                      settings.val_interval) for m in planned if m["variant"] != "base"]


# --------------------------------------------------------------------------------- evaluation

def eval_overrides(settings: Settings, part: str) -> list[str]:
    """evaluate.py overrides of one evaluation part (besides the checkpoints and the run directory)."""
    e = settings.evaluation[part]
    if part == "calibration":
        return [*settings.eval_common, "metrics=[ce,cfm]", "limit=null", f"eval.cfm_chunks={int(e['chunks'])}",
                *_skip(settings)]
    if part == "profile":
        return [*settings.eval_common, "metrics=[profile]", "limit=null",
                f"eval.cfm_chunks={int(settings.evaluation['calibration']['chunks'])}", *_skip(settings),
                f"eval.profile_chunks={int(e['chunks'])}", f"eval.profile_lengths={override_value(e['lengths'])}"]
    return [*settings.eval_common, f"metrics={override_value(settings.benchmarks)}", f"limit={int(e['limit'])}",
            f"num_samples={int(e['num_samples'])}", f"max_new_tokens={int(e['max_new_tokens'])}"]


def _skip(settings: Settings) -> list[str]:
    """``eval.cfm_skip``: the comparison's chunks exclude those of the in-training val/cfm (the lr choice)."""
    skip = int(settings.evaluation["calibration"].get("skip") or 0)
    return [f"eval.cfm_skip={skip}"] if skip else []


def _signature(command: str) -> list[str]:
    """The overrides of an evaluate.py command without its checkpoints and run directory."""
    return [a for a in shlex.split(command)[2:] if not a.startswith(("ckpt=", "hydra.run.dir="))]


def eval_calls(out: Path, part: str) -> list[Path]:
    return sorted((out / "eval" / part).glob("call*"))


def check_calls(settings: Settings, part: str) -> None:
    """Raise :class:`ReproError` when an evaluation call of ``part`` was made with other settings."""
    wanted = eval_overrides(settings, part)
    for call in eval_calls(settings.out, part):
        record = read_record(call)
        if record is not None and _signature(record["command"]) != wanted:
            was = shlex.join(_signature(record["command"]))
            raise ReproError(f"{call} was evaluated with other settings:\n  was: {was}\n  now: {shlex.join(wanted)}"
                             f"\nuse another --out, or delete {call.parent} to redo it")


def read_results(out: Path, part: str) -> list[dict]:
    """Every model result of ``part`` under the output folder, each with ``_call`` (its directory)."""
    results = []
    for call in eval_calls(out, part):
        for path in sorted(call.glob(f"*/{RESULTS}")):
            results.append({**json.loads(path.read_text()), "_call": str(path.parent)})
    return results


def matches(model: dict, result: dict) -> bool:
    """Whether ``result`` is the evaluation of ``model`` (same checkpoint argument, or a run dir that
    ends with the model's key, should the output folder have moved)."""
    ckpt = str(result.get("ckpt", ""))
    if ckpt == model["ckpt"]:
        return True
    key = PurePosixPath(model["key"]).parts
    return model["variant"] != "base" and PurePosixPath(ckpt).parts[-len(key):] == key


def pending(planned: list[dict], results: list[dict]) -> list[dict]:
    """The planned models that have no result yet."""
    return [m for m in planned if not any(matches(m, r) for r in results)]


def eval_job(settings: Settings, part: str, todo: list[dict]) -> Job:
    """One evaluate.py call for the models ``todo`` in a new ``eval/<part>/call<NN>`` directory."""
    index = len(eval_calls(settings.out, part))
    directory = settings.out / "eval" / part / f"call{index:02d}"
    ckpts = ",".join(m["ckpt"] for m in todo)
    argv = ("evaluate.py", *eval_overrides(settings, part), f"ckpt=[{ckpts}]",
            f"hydra.run.dir={settings.path_arg(directory)}")
    return Job(f"evaluate {part}: {len(todo)} model(s)", argv, directory, discard=(HYDRA_RUNTIME,))


# ---------------------------------------------------------------------------------- plan.json

def hardware() -> dict:
    """CPU model (/proc/cpuinfo), core count, GPU, and the versions that produced the numbers."""
    import lightning
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "os": platform.platform()}


def recorded_argv(settings: Settings, argv: list[str]) -> list[str]:
    """The driver's arguments as ``plan.json`` records them: the folders given to ``--out`` and
    ``--mbpp`` named as the commands it runs name them (relative to the repository when inside it),
    so that a committed reproduction carries no path of the machine it ran on."""
    paths = {"--out": settings.path_arg(settings.out), "--mbpp": settings.mbpp_path}
    recorded, flag = [], None
    for arg in argv:
        name, eq, value = arg.partition("=")
        if flag is not None:
            recorded.append(paths[flag] or arg)
        elif eq and name in paths:
            recorded.append(f"{name}={paths[name] or value}")
        else:
            recorded.append(arg)
        flag = arg if flag is None and arg in paths else None
    return recorded


def write_plan(settings: Settings, planned: list[dict], lrs: dict[str, float], lr_source: str,
               argv: list[str]) -> Path:
    """Write ``plan.json``: everything the report needs besides the run and evaluation outputs."""
    sweep = {**settings.sweep, "runs": sweep_entries(settings)} if lr_source.startswith("lr sweep") else None
    plan = {
        "command": shlex.join(["python", "-m", "experiments.repro", *recorded_argv(settings, argv)]),
        "quick": settings.quick,
        "sizes": settings.sizes,
        "seeds": list(settings.seeds),
        "first_seed_only": list(settings.first_seed_only),
        "variants": {n: {"label": v.label, "method": v.method, "overrides": list(v.overrides), "knobs": v.knobs}
                     for n, v in settings.variants.items()},
        "lr": lrs, "lr_source": lr_source, "sweep": sweep,
        "models": planned,
        "eval": {**settings.evaluation, "benchmarks": settings.benchmarks, "mbpp_path": settings.mbpp_path,
                 "parts": list(settings.parts),
                 "commands": {p: shlex.join(["python", "evaluate.py", *eval_overrides(settings, p)])
                              for p in settings.parts}},
        "train_common": list(settings.train_common),
        "hardware": hardware(),
    }
    return write_json(plan, settings.out / PLAN)
