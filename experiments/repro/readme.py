"""``README.md`` of a reproduction, written from its output folder alone.

Inputs: ``plan.json`` (what was planned), the run directories (``metrics.csv``, ``job.json``) and the
evaluation results (``eval/*/call*/*/results.json``). Outputs next to them: ``README.md``,
``fm_profile.png``, ``training_curves.png`` and ``runs.csv`` (every model's numbers with its
directories). Missing pieces (a run still to come) show as "–", so the report can be written at any
time (``python -m experiments.repro --report-only``).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from ebft.files import write_csv, write_text
from ebft.reporting import cell, markdown_table
from experiments.repro import comparison, diagnosis, figures
from experiments.repro.jobs import read_record
from experiments.repro.plan import PARTS, PLAN, eval_calls, read_results
from experiments.repro.settings import format_lr
from experiments.repro.sweep import sweep_points
from experiments.repro.tables import attach_results, rate_columns, variant_stats

README = "README.md"
VERDICT_METRICS = ("FM", "CE")


def _rel(out: Path, path: str | None) -> str:
    if not path:
        return "–"
    p = Path(path)
    return str(p.relative_to(out)) if p.is_absolute() and p.is_relative_to(out) else str(p)


# ------------------------------------------------------------------------------------ sections

def headline(models: list[dict], plan: dict) -> tuple[str, list[str]]:
    """Table 1's shape: one row per variant, mean ± sd over its seeds."""
    cols = ["CE", "FM", *rate_columns(models)]
    rows = []
    for variant in dict.fromkeys(m["variant"] for m in models):
        stats = variant_stats(models, variant)
        label = next(m["label"] for m in models if m["variant"] == variant)
        seeds = sum(1 for m in models if m["variant"] == variant and m["metrics"])
        rows.append([label, str(seeds), *(stats[c].text() if c in stats else "–" for c in cols)])
    return markdown_table(["method", "seeds", *cols], rows), cols


def _seed_text(c: comparison.Comparison) -> str:
    return ", ".join(f"{seed if seed is not None else '–'}: {v:+.4f}" for seed, v in c.per_seed.items())


def comparison_table(found: list[comparison.Comparison], what: str) -> str:
    rows = [[c.metric, cell(c.value, 4), cell(c.reference_value, 4),
             f"{c.diff.mean:+.4f} [{c.diff.ci_low:+.4f}, {c.diff.ci_high:+.4f}]", f"{c.diff.p_value:.3g}",
             f"{c.diff.se:.4f}", str(c.diff.n), _seed_text(c), c.outcome] for c in found]
    return markdown_table(["metric", what.split(" vs ")[0], what.split(" vs ")[1], "Δ [95% CI]", "p", "SE", "units",
                           "Δ per seed", "lower?"], rows)


def verdict_section(models: list[dict], plan: dict) -> tuple[list[str], bool]:
    """Per EBFT variant: paired differences against SFT and against the base model; and SFT against
    the base model. Returns the lines and whether EBFT's FM was lower than SFT's beyond noise."""
    lengths = list(plan["eval"]["profile"]["lengths"])
    lines, won = [], False
    pairs = [(n, "sft") for n, v in plan["variants"].items() if v["method"] == "ebft"]
    pairs += [(n, "base") for n, v in plan["variants"].items() if v["method"] in ("sft", "ebft")]
    for variant, reference in pairs:
        found = comparison.comparisons(models, variant, reference, lengths)
        label = plan["variants"][variant]["label"]
        ref_label = "Base" if reference == "base" else plan["variants"][reference]["label"]
        if not found:
            lines += [f"### {label} vs {ref_label}", "", "(not evaluated yet)", ""]
            continue
        fm = next((c for c in found if c.metric == "FM"), None)
        if reference == "sft" and variant == "ebft" and fm is not None:
            won = fm.outcome.startswith("yes")
        lines += [f"### {label} vs {ref_label}", "", comparison_table(found, f"{label} vs {ref_label}"), "",
                  f"**In plain words:** {plain_words(label, ref_label, found)}", ""]
    return lines, won


def plain_words(label: str, ref_label: str, found: list[comparison.Comparison]) -> str:
    """One sentence: where the variant was lower than the reference beyond the 95% interval, where higher."""
    lower = [c.metric for c in found if c.outcome.startswith("yes")]
    higher = [c.metric for c in found if c.outcome.startswith("no (higher")]
    parts = [f"{label} was lower than {ref_label} on {', '.join(lower)}" if lower
             else f"{label} was lower than {ref_label} on none of these metrics beyond noise"]
    if higher:
        parts.append(f"higher (worse) on {', '.join(higher)}")
    rest = [c.metric for c in found if c.outcome == "no (within noise)"]
    if rest:
        parts.append(f"within noise on {', '.join(rest)}")
    return "; ".join(parts) + " (paired 95% intervals over the same held-out units and random numbers)."


def curves_section(out: Path, models: list[dict], plan: dict) -> list[str]:
    """In-sample vs held-out: the paired change of CFM since the start of each run, by chunks seen."""
    batch = int(plan["sizes"]["batch_size"])
    rows = []
    for name, variant in plan["variants"].items():
        curves = comparison.variant_curves(out, models, name, batch)
        final = comparison.final_changes(curves) if curves else {}
        if not final:
            continue
        val, train = final.get("val"), final.get("train")
        per_100 = (f"{100 * train[0] / train[2]:+.4f}" if train else "–")
        rows.append([variant["label"], str(len(curves)), str(val[2] if val else "–"),
                     f"{val[0]:+.4f} ± {val[1]:.4f}" if val else "–",
                     f"{train[0]:+.4f} ± {train[1]:.4f}" if train else "–", per_100])
    if not rows:
        return ["(no run has logged a change yet)", ""]
    z = plan["sizes"]
    return [markdown_table(["method", "runs", "chunks seen", "held-out CFM change (val/cfm)",
                            "in-sample CFM change (train/cfm_fixed)", "in-sample change per 100 chunks"], rows), "",
            f"Paired changes since each run's first evaluation (the base model), mean over seeds ± standard error: "
            f"held-out on {z['in_training_cfm_chunks']} fixed validation chunks, in-sample on the run's first "
            f"{z.get('in_training_train_chunks', '?')} training chunks (trained on in its first steps). A method "
            "that lowers the in-sample CFM but not the held-out one is memorising.", "",
            "![in-sample vs held-out CFM](cfm_curves.png)", ""]


def trained_lrs(plan: dict) -> dict[str, float]:
    """The learning rate of every method the plan trains (the config also names methods left out)."""
    methods = {v["method"] for v in plan["variants"].values()}
    return {m: lr for m, lr in plan["lr"].items() if m in methods}


def sweep_section(out: Path, plan: dict) -> list[str]:
    if not plan["lr_source"].startswith("lr sweep") or not plan.get("sweep"):
        return [f"Learning rates from the config (`repro.lr` in conf/experiment/repro_small.yaml): "
                + ", ".join(f"{k} {format_lr(v)}" for k, v in trained_lrs(plan).items())
                + ". Run the driver with `--lr-sweep` to choose them on the validation split.", ""]
    s = plan["sweep"]
    rows = [[plan["variants"][p.variant]["label"], format_lr(p.lr), cell(p.start_ce), cell(p.val_ce), cell(p.start_cfm),
             f"{cell(p.val_cfm)} ± {cell(p.val_cfm_se)}", "ok" if p.ok else "failed/diverged",
             "**chosen**" if plan["lr_source"] == "lr sweep" and plan["lr"].get(p.method) == p.lr else "", p.dir] for p in sweep_points(out, s["runs"])]
    reused = all(r["dir"].startswith("runs/") for r in s["runs"])
    return [f"{len(s['lrs'])} lrs × {s['steps']} steps per method at seed {s['seed']}, chosen on the in-training "
            f"val/cfm of {plan['sizes']['in_training_cfm_chunks']} fixed validation chunks only (the comparison "
            "below uses other held-out chunks; the benchmarks are never looked at). Rule: the lowest final val "
            "CFM; lrs within two paired standard errors of it are tied, and the lowest final val CE among the "
            "tied wins." + (" These runs are the headline runs of that seed: the chosen lr is not trained again."
                            if reused else ""), "",
            markdown_table(["method", "lr", "val CE start", "val CE end", "val CFM start", "val CFM end ± se",
                            "status", "", "run dir"], rows), "",
            ("Chosen: " + ", ".join(f"{m} {format_lr(lr)}" for m, lr in trained_lrs(plan).items()) + "."
             if plan["lr_source"] == "lr sweep" else "The sweep is still running: no lr chosen yet."), ""]


def budget_section(plan: dict) -> list[str]:
    z, v = plan["sizes"], plan["variants"]
    chunks = z["steps"] * z["batch_size"]
    ebft = next((x["knobs"] for x in v.values() if x["method"] == "ebft"), {})
    rlvr = next((x["knobs"] for x in v.values() if x["method"] == "rlvr"), None)
    ebft_tokens = z["batch_size"] * z["blocks"] * ebft.get("num_samples", 0) * z["gen_len"]
    lines = [f"- Model {z['model']}, task {z['task']}; chunks of T={z['seq_len']} tokens, C={z['context_len']}, "
             f"s={z['stride']}, G={z['gen_len']} (NB={z['blocks']} contexts per chunk); held-out split "
             f"{z['val_size']} rows" + (f" (of data.limit={z['data_limit']} rows)." if z["data_limit"] else "."),
             f"- Same data budget: every method takes {z['steps']} optimizer steps of {z['batch_size']} training "
             f"examples. SFT and EBFT see the same {chunks} chunks ({chunks * z['seq_len']:,} tokens; EBFT also "
             f"generates {ebft_tokens} tokens per step: {z['batch_size']} × {z['blocks']} contexts × "
             f"{ebft.get('num_samples', '?')} samples × G={z['gen_len']})."]
    if rlvr:
        rl_tokens = z["batch_size"] * rlvr["num_samples"] * rlvr["max_new_tokens"]
        lines.append(f"- RLVR's budget is the same number of optimizer steps and the same number of training rows "
                     f"per step: {z['steps']} × {z['batch_size']} = {chunks} prompts (the question of a training row "
                     f"with unit tests or doctests), each with {rlvr['num_samples']} completions of at most "
                     f"{rlvr['max_new_tokens']} tokens (≤ {rl_tokens} generated tokens per step, close to EBFT's "
                     f"{ebft_tokens}). It sees questions only, never the reference answers.")
    c, f, d = (plan["eval"][p] for p in ("calibration", "profile", "downstream"))
    lines += [f"- Evaluation (evaluate.py): CE and FM on a fixed random subset of {c['chunks']} held-out chunks "
              f"({c['chunks'] * z['blocks']} contexts) that excludes the {c.get('skip', 0)} chunks of the in-training "
              f"val/cfm (FM = unbiased CFM estimate, n=4 samples at temperature 0.6, G={z['gen_len']}); the FM "
              f"profile at G = {', '.join(map(str, f['lengths']))} on the first {f['chunks']} of those chunks."]
    if "downstream" in plan["eval"].get("parts", ()):
        lines.append(f"- {', '.join(plan['eval']['benchmarks'])} on their first {d['limit']} problems: greedy and "
                     f"{d['num_samples']} samples at temperature 0.6 (pass@1, pass@{d['num_samples']}), at most "
                     f"{d['max_new_tokens']} new tokens."
                     + ("" if plan["eval"]["mbpp_path"] else " MBPP skipped: no --mbpp / EBFT_MBPP given."))
    else:
        lines.append("- Not run by default (flags `--downstream`, `--rlvr`): pass@k on a few benchmark problems, "
                     "which a 135M model nearly never solves, and RLVR, which earns no reward at this size and so "
                     "never moves.")
    lines.append(f"- Why these sizes: the question needs many optimizer steps and CFM differences measured to "
                 f"~0.005 (see the comment of conf/experiment/repro_small.yaml for the measured costs). "
                 f"T={z['seq_len']} keeps an EBFT step (all {z['blocks']} × {ebft.get('num_samples', '?')} rollouts "
                 f"of a chunk in one strided row) at seconds on a CPU. The paper's T=1024, 16-chunk batches and 2 "
                 "epochs need a GPU.")
    return lines + [""]


def runs_section(out: Path, models: list[dict], cols: list[str], parts: list[str]) -> tuple[list[str], list[dict]]:
    """Every model's numbers with the directories they come from; also the rows of runs.csv."""
    extra = [c for c in ("CE answer", "FM se", "FM whitened") if any(c in m["metrics"] for m in models)]
    keys = cols[:2] + extra + cols[2:]
    rows, records = [], []
    for m in models:
        where = [m.get("dir") or m["ckpt"], *(_rel(out, m.get(p) and m[p]["_call"]) for p in parts)]
        rows.append([m["label"], str(m.get("seed") or "–"), format_lr(m["lr"]) if m.get("lr") else "–", *where,
                     *(cell(m["metrics"].get(k), 4) for k in keys)])
        records.append({"variant": m["variant"], "label": m["label"], "seed": m.get("seed"), "lr": m.get("lr"),
                        "run_dir": where[0], **{f"{p}_result": w for p, w in zip(parts, where[1:])},
                        **{k: m["metrics"].get(k) for k in keys}})
    header = ["model", "seed", "lr", "run dir", *(f"{p} result" for p in parts), *keys]
    return [markdown_table(header, rows), ""], records


def _records(out: Path, plan: dict) -> list[tuple[str, dict]]:
    """(stage, job.json) of every job under the output folder, in running order (a sweep run that is also a
    headline run counts once, as the sweep's)."""
    dirs = [("lr sweep", out / r["dir"]) for r in (plan.get("sweep") or {}).get("runs", [])]
    swept = {d for _, d in dirs}
    dirs += [("training", out / m["dir"]) for m in plan["models"] if m.get("dir") and out / m["dir"] not in swept]
    dirs += [(f"evaluation ({p})", call) for p in plan["eval"].get("parts", PARTS) for call in eval_calls(out, p)]
    return [(stage, rec) for stage, d in dirs if (rec := read_record(d)) is not None]


def status_line(out: Path, plan: dict, parts: list[str]) -> str:
    """What of the plan is on disk: finished training runs and evaluated models per part."""
    trained = [m for m in plan["models"] if m.get("dir")]
    done = sum(1 for m in trained if (read_record(out / m["dir"]) or {}).get("returncode") == 0)
    evaluated = {p: len(read_results(out, p)) for p in parts}
    sweep = (plan.get("sweep") or {}).get("runs", [])
    swept = sum(1 for r in sweep if (read_record(out / r["dir"]) or {}).get("returncode") is not None)
    complete = done == len(trained) and all(n >= len(plan["models"]) for n in evaluated.values())
    head = "**Status: complete.**" if complete else "**Status: in progress** (the same command continues it)."
    return (f"{head} Learning-rate sweep runs finished: {swept}/{len(sweep)}; training runs finished: "
            f"{done}/{len(trained)}; models evaluated: "
            + ", ".join(f"{p} {n}/{len(plan['models'])}" for p, n in evaluated.items()) + ".")


def time_section(out: Path, plan: dict, models: list[dict]) -> list[str]:
    """Wall and CPU time per stage (from job.json), seconds per training step, the hardware."""
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for stage, rec in _records(out, plan):
        wall[stage] = wall.get(stage, 0.0) + float(rec.get("seconds") or 0.0)
        cpu[stage] = cpu.get(stage, 0.0) + float(rec.get("cpu_seconds") or 0.0)
    hw = plan["hardware"]
    lines = ["| stage | wall time | CPU time |", "|---|---:|---:|"]
    lines += [f"| {stage} | {wall[stage] / 60:.1f} min | {cpu[stage] / 60:.1f} min |" for stage in wall]
    lines += [f"| **total** | **{sum(wall.values()) / 60:.1f} min** | {sum(cpu.values()) / 60:.1f} min |", "",
              "CPU time is the work done (user + system, all cores); on a machine shared with other jobs the wall "
              "time is longer than on an idle one.", ""]
    per_step = []
    for name, variant in plan["variants"].items():
        runs = diagnosis.variant_runs(out, models, name)
        if runs:
            sps = diagnosis.mean(r.seconds_per_step for r in runs)
            sample = diagnosis.mean_of(runs, "perf/sample_s")
            per_step.append(f"{variant['label']} {sps:.1f} s/step"
                            + (f" (sampling {sample:.1f} s)" if math.isfinite(sample) else ""))
    if per_step:
        lines += ["Per training step (run wall time / steps, start-up and validation included): "
                  + "; ".join(per_step) + ".", ""]
    lines += [f"Hardware: {hw['cpu']}, {hw['cores']} logical cores, GPU: {hw['gpu']}; Python {hw['python']}, "
              f"torch {hw['torch']}, transformers {hw['transformers']}, lightning {hw['lightning']}; {hw['os']}.", ""]
    return lines


def commands_section(out: Path, plan: dict) -> list[str]:
    lines = ["The driver:", "", "```bash", plan["command"], "```", "",
             "Every job it ran (from each directory's `job.json`; run from the repository root):", "", "```bash"]
    lines += [rec["command"] for _, rec in _records(out, plan)]
    return lines + ["```", ""]


# --------------------------------------------------------------------------------------- entry

def write_report(out: str | Path) -> Path:
    """Write README.md, the figures and runs.csv into ``out``; return the README's path."""
    out = Path(out).resolve()
    plan_path = out / PLAN
    if not plan_path.is_file():
        raise FileNotFoundError(f"no {PLAN} in {out}: run `python -m experiments.repro --out {out}` first")
    plan = json.loads(plan_path.read_text())
    parts = plan["eval"].get("parts", PARTS)
    models = attach_results(plan["models"], {p: read_results(out, p) for p in parts})
    z = plan["sizes"]
    table, cols = headline(models, plan)
    verdicts, ebft_won = verdict_section(models, plan)
    main_ebft = next((n for n, v in plan["variants"].items() if v["method"] == "ebft"), None)
    title = f"FM profile, {z['task']}, {z['model']} (T={z['seq_len']}, trained at G={z['gen_len']})"
    profile = figures.fm_profile(models, out / "fm_profile.png", title)
    curves = figures.training_curves(out, models, out / "training_curves.png")
    figures.cfm_curves(out, models, plan, out / "cfm_curves.png")
    runs_lines, records = runs_section(out, models, cols, parts)
    write_csv(out / "runs.csv", list(records[0]), [list(r.values()) for r in records])

    lines = [f"# EBFT vs SFT, small reproduction ({z['task']}, {z['model']})", "",
             f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `{plan['command']}` from this folder's "
             f"runs (seeds {', '.join(map(str, plan['seeds']))}). It repeats, at CPU scale, the comparison of the "
             "paper's Table 1 (Q&A coding) and Figures 2-3, where EBFT reached a lower held-out CE and FM than SFT "
             "and the base model. Every comparison is paired: the same held-out units and random numbers for both "
             "models.", ""]
    lines += [status_line(out, plan, parts), ""]
    if plan["quick"]:
        lines += ["> **Quick mode**: a tiny random model and a few steps check the pipeline; the numbers mean "
                  "nothing.", ""]
    lines += ["## Results (the shape of the paper's Table 1)", "", table, "",
              f"Mean ± sample s.d. over seeds (base model: one evaluation). CE: held-out cross-entropy over all "
              f"tokens; FM: held-out conditional feature-matching loss (lower is better for both); "
              f"greedy / pass@k: fraction of problems solved (unbiased pass@k). Learning rates: "
              + ", ".join(f"{k} {format_lr(v)}" for k, v in trained_lrs(plan).items()) + f" ({plan['lr_source']}).", "",
              "## Did EBFT beat SFT? (paired differences, lower is better)", "", *verdicts,
              "## In-sample vs held-out CFM during training", "", *curves_section(out, models, plan)]
    if not ebft_won and main_ebft:
        label = plan["variants"][main_ebft]["label"]
        header, rows = diagnosis.stats_table(out, plan)
        lines += ["## Diagnosis", "", f"Computed from the runs' metrics.csv ({label} against SFT):", ""]
        lines += [f"- {text}" for text in diagnosis.diagnose(out, plan, models, main_ebft)]
        lines += ["", "Training statistics (means over steps, then over seeds; first→last quarter of the steps "
                  "for trends; validation at the first and the last evaluation):", "",
                  markdown_table(header, rows) if rows else "no run has a metrics.csv yet", ""]
    lines += ["## FM profile", "", "![FM profile](fm_profile.png)" if profile else "(no profile yet)", "",
              "## Training curves", "",
              "![training curves](training_curves.png)" if curves else "(no metrics.csv yet)", "",
              "Validation CE / CFM on the in-training held-out subset; the training CE is the batch's "
              "(SFT: answer tokens, its loss; EBFT: all chunk tokens, its γ-weighted term; RLVR logs none).", "",
              "## Learning rates", "", *sweep_section(out, plan),
              "## Sizes and budget", "", *budget_section(plan),
              "## Every run (traceability)", "", *runs_lines,
              "Also in `runs.csv`. Run dirs hold `metrics.csv`, `hf_model/`, `.hydra/` and `job.json` (their "
              "Lightning checkpoints are removed after the run); result dirs hold `results.json` and the sampled "
              "completions.", "",
              "## Wall time and hardware", "", *time_section(out, plan, models),
              "## Commands", "", *commands_section(out, plan)]
    return write_text(out / README, "\n".join(lines))
