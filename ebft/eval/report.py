"""Comparison tables and the FM-profile plot from per-model result files.

Every evaluated model leaves one ``results.json``; a report gathers all of them under a directory
(the run directory, or the sweep directory of a multirun) and writes

- ``results.md`` / ``results.csv``: one row per model, columns in the shape of the paper's Table 1
  (CE, FM, then per benchmark greedy and pass@k, or greedy and best-of-k);
- ``fm_profile.csv`` / ``fm_profile.png``: CFM against completion length G, one curve per model
  with its standard error (paper Figures 1 and 2);
- ``paired.md`` / ``paired.csv`` (also appended to ``results.md``): every model against a reference
  model on the same held-out units (:mod:`ebft.eval.paired`): CE per chunk, CFM and its whitened
  proxy per context, the FM profile per context and length, each with the paired difference, its 95%
  interval, the sign-flip p-value and, to show what pairing gains, the standard error an unpaired
  comparison of the two means would have.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from ebft.eval.paired import chunk_means, paired_by_chunk, paired_difference, scored_units
from ebft.files import write_csv, write_text
from ebft.reporting import ProfileCurve, markdown_table, profile_plot

RESULTS_FILE = "results.json"
UNITS_FILE = "per_context.json"
PAIRED_SETTINGS = {"seed": None, "cfm_num_samples": None, "cfm_temperature": None, "feature_network": None,
                   "whitening": None, "cfm_skip": None, "anchors": "all", "min_answer_prefix": 0, "answer_turns": "all",
                   "document_mask": False}
"""Settings two results must share for their per-context values to be paired, with the value a result
recorded before the setting existed stands for (the contexts scored: a comparison never mixes all
blocks with answer blocks, or attention across examples with attention within them)."""
CALIBRATION_COLUMNS = {"ce": "CE", "ce_answer": "CE answer", "cfm": "FM", "cfm_whitened": "FM whitened"}


def collect(root: str | os.PathLike) -> list[dict]:
    """All ``results.json`` under ``root``, in evaluation order (multirun job, then position in ckpt)."""
    results = [{**json.loads(p.read_text()), "dir": p.parent} for p in Path(root).rglob(RESULTS_FILE)]
    return sorted(results, key=lambda r: tuple(r["order"]))


def columns_of(result: dict) -> dict[str, float]:
    """The table columns of one result: calibration, then ``"<benchmark> <metric>"``."""
    row = {name: result["calibration"][key] for key, name in CALIBRATION_COLUMNS.items()
           if key in result.get("calibration", {})}
    for bench, scores in result.get("downstream", {}).items():
        row.update({f"{bench} {metric}": value for metric, value in scores.items()})
    if result.get("error"):  # a model that could not be evaluated
        row["error"] = result["error"]
    return row


def table(results: Sequence[dict]) -> tuple[list[str], list[list]]:
    """Header and rows (``model`` first); a column missing for a model stays empty."""
    per_model = [columns_of(r) for r in results]
    header = ["model", *dict.fromkeys(c for row in per_model for c in row)]
    return header, [[r["model"], *(row.get(c) for c in header[1:])] for r, row in zip(results, per_model)]


def write_profile(results: Sequence[dict], root: Path) -> list[Path]:
    """``fm_profile.csv`` and ``fm_profile.png`` for the results that have a profile."""
    profiled = [r for r in results if r.get("profile")]
    if not profiled:
        return []
    points = [[r["model"], *point] for r in profiled for point in zip(*(r["profile"][k] for k in ("G", "cfm", "se")))]
    first = profiled[0]
    curves = [ProfileCurve(r["model"], r["profile"]["G"], r["profile"]["cfm"], r["profile"]["se"]) for r in profiled]
    return [write_csv(root / "fm_profile.csv", ["model", "G", "cfm", "se"], points),
            profile_plot(curves, root / "fm_profile.png",
                         f"FM profile, {first['task']} (n={first['settings']['cfm_num_samples']} samples, "
                         f"temperature {first['settings']['cfm_temperature']})")]


def _units(result: dict) -> dict:
    path = Path(result["dir"]) / UNITS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def reference_of(results: Sequence[dict], reference: str | None) -> dict | None:
    """The reference result: the one whose ckpt or label is ``reference`` (None if there is none), or the
    first evaluated when ``reference`` is None."""
    if reference is None:
        return results[0]
    return next((r for r in results if str(reference) in (r["ckpt"], r["model"])), None)


def _pairs(units: dict, ref_units: dict) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(metric label, model values, reference values) for every per-unit metric both results have."""
    out = []
    for key, label in (("ce", "CE"), ("cfm", "FM"), ("cfm_whitened", "FM whitened")):
        if key in units and key in ref_units:
            out.append((label, torch.tensor(units[key]), torch.tensor(ref_units[key])))
    for g, values in units.get("profile", {}).items():
        if g in ref_units.get("profile", {}):
            out.append((f"FM G={g}", torch.tensor(values), torch.tensor(ref_units["profile"][g])))
    return out


PAIRED_HEADER = ["metric", "model", "reference", "value", "reference value", "difference", "95% CI low",
                 "95% CI high", "p (sign flip)", "SE paired (contexts)", "SE paired (chunks)", "SE unpaired (chunks)",
                 "units"]


def paired_rows(results: Sequence[dict], reference: str | None = None) -> tuple[list[list], list[str]]:
    """Rows of :data:`PAIRED_HEADER`, one per (model, metric) against the reference, and notes on the
    models that could not be paired. CE is paired per chunk; CFM per (chunk, block) context, with the
    chunk-clustered standard error beside it."""
    ref = reference_of(results, reference)
    if ref is None:
        return [], [f"eval.reference={reference} is none of the evaluated models "
                    f"({', '.join(r['ckpt'] for r in results)}): nothing paired"]
    ref_units, rows, notes = _units(ref), [], []
    for r in results:
        if r is ref:
            continue
        differ = [k for k, default in PAIRED_SETTINGS.items()
                  if r.get("settings", {}).get(k, default) != ref.get("settings", {}).get(k, default)]
        units = _units(r)
        if differ or not units:
            why = f"settings differ ({', '.join(differ)})" if differ else f"no {UNITS_FILE}"
            notes.append(f"{r['model']} not paired with {ref['model']}: {why}")
            continue
        for label, a, b in _pairs(units, ref_units):
            if a.shape != b.shape:
                notes.append(f"{r['model']} {label}: {tuple(a.shape)} values vs {tuple(b.shape)} for the reference "
                             "(other held-out chunks): not paired")
                continue
            if a.numel() < 2:
                notes.append(f"{r['model']} {label}: one unit, nothing to pair")
                continue
            d = paired_difference(a, b)
            by_chunk = d if a.dim() == 1 else paired_by_chunk(a, b) if len(a) > 1 else None
            per_chunk = scored_units(*((chunk_means(a), chunk_means(b)) if a.dim() == 2 else (a, b)))
            unpaired = math.sqrt(sum(x.var().item() / len(x) for x in per_chunk))
            rows.append([label, r["model"], ref["model"], a.double().nanmean().item(), b.double().nanmean().item(), d.mean,
                         d.ci_low, d.ci_high, d.p_value, d.se, by_chunk.se if by_chunk else math.nan, unpaired, d.n])
    return rows, notes


def paired_markdown(rows: Sequence[Sequence], notes: Sequence[str]) -> str:
    """The paired table in markdown: difference with its interval, p, and the SEs side by side."""
    lines = ["| metric | model | value | reference | difference [95% CI] | p | SE paired | SE paired, chunks | "
             "SE unpaired | units |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (metric, model, ref, value, ref_value, diff, low, high, p, se, se_chunks, se_unpaired, n) in rows:
        lines.append(f"| {metric} | {model} | {value:.4f} | {ref_value:.4f} ({ref}) | {diff:+.4f} [{low:+.4f}, "
                     f"{high:+.4f}] | {p:.3g} | {se:.4f} | {se_chunks:.4f} | {se_unpaired:.4f} | {n} |")
    return "\n".join(lines + [f"\n- {note}" for note in notes])


def signature_notes(results: Sequence[dict]) -> str:
    """The sacreBLEU signatures behind the BLEU / chrF columns (from the results' details), as lines
    under the table; empty without translation results."""
    found: dict[str, list[str]] = {}
    for result in results:
        for details in (result.get("details") or {}).values():
            for name, sigs in (details.get("signatures") or {}).items():
                for sig in sigs.split(" ; "):  # one per tokenizer
                    if sig not in found.setdefault(name, []):
                        found[name].append(sig)
    return "".join(f"\n\nsacreBLEU signature, {name}: " + " ; ".join(f"`{s}`" for s in sigs)
                   for name, sigs in found.items())


def write_report(root: str | os.PathLike, reference: str | None = None) -> str:
    """Gather every result under ``root``, write the tables, the paired comparison against ``reference``
    (default: the first model evaluated) and the profile plot; return the markdown of both tables."""
    root = Path(root)
    results = collect(root)
    if not results:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}: evaluate a model first")
    header, rows = table(results)
    text = markdown_table(header, rows) + signature_notes(results)
    results = [r for r in results if not r.get("error")]  # failed models: a row with their error, no more
    if len(results) > 1:
        paired, notes = paired_rows(results, reference)
        if paired or notes:
            write_csv(root / "paired.csv", PAIRED_HEADER, paired)
            section = paired_markdown(paired, notes)
            write_text(root / "paired.md", section + "\n")
            text += f"\n\nPaired differences (model - reference) on the same held-out units:\n\n{section}"
    write_text(root / "results.md", text + "\n")
    write_csv(root / "results.csv", header, rows)
    write_profile(results, root)
    return text
