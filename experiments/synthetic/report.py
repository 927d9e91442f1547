"""The known-answer bench's report: one figure (exact KLs against training-set size), paired tables with
intervals over seeds and over test units, the controls, the design check, the ablations and a verdict.

Every comparison is paired: all models are tested on the same contexts and chunks with the same
random numbers. For a variant against SFT at one size, each seed gives a paired mean difference over
the test units; the table shows the mean over seeds with a 95% t-interval over the seeds (the
training-set draw is the noise a user meets) and, beside it, the interval over all units pooled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ebft.eval.paired import paired_difference
from ebft.files import write_csv, write_json, write_text
from ebft.reporting import Line, Panel, cell, line_panels, markdown_table

METRICS = ("reverse_kl/G8", "reverse_kl/G16", "forward_kl/G16", "ce", "cfm")
HEADLINE = ("reverse_kl/G16", "forward_kl/G16")
VARIANTS = ("sft", "ebft", "ebft_ws", "ce_only")
NAMES = {"sft": "SFT (early-stopped)", "ebft": "EBFT from the base", "ebft_ws": "EBFT warm-started",
         "ce_only": "CE-only (EBFT, rl_coef 0)"}
CLAIMS_FILE = "claims.json"
"""The orderings whose 95% interval excludes 0 (``sign``: lower or higher), replayed by the slow test."""
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of per-seed values (a single seed: no interval)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), math.nan, math.nan
    half = T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def paired(tests: dict, a: str, b: str, metric: str) -> dict:
    """``a - b`` on ``metric``: per-seed paired means, their t-interval, and the pooled unit-level interval.
    A model with one run (the base, the yardstick) is paired with every seed of the other."""
    left, right = tests[a], tests[b]
    left, right = left * (len(right) if len(left) == 1 else 1), right * (len(left) if len(right) == 1 else 1)
    per_seed = [float(np.mean(np.subtract(x[metric], y[metric]))) for x, y in zip(left, right)]
    mean, low, high = seed_interval(per_seed)
    pooled = paired_difference(np.concatenate([x[metric] for x in left]),
                               np.concatenate([y[metric] for y in right]), n_permutations=0)
    return {"variant": a, "reference": b, "metric": metric, "mean": mean, "seeds_low": low, "seeds_high": high,
            "units_low": pooled.ci_low, "units_high": pooled.ci_high, "per_seed": per_seed}


NEGLIGIBLE = 1e-3
"""Nats: a difference whose interval excludes 0 but is smaller than this is called negligible."""


def verdict_of(row: dict) -> str:
    """``lower`` / ``higher`` when the 95% interval over seeds (over units with one seed) excludes 0 and the
    difference is at least :data:`NEGLIGIBLE`, else why not."""
    low, high = (row["seeds_low"], row["seeds_high"]) if not math.isnan(row["seeds_low"]) else \
        (row["units_low"], row["units_high"])
    if (high < 0 or low > 0) and abs(row["mean"]) < NEGLIGIBLE:
        return f"negligible (|difference| < {NEGLIGIBLE})"
    if high < 0:
        return "lower"
    if low > 0:
        return "higher"
    return f"within noise (interval width {high - low:.4f})"


def level(tests: dict, name: str, metric: str) -> tuple[float, float, float]:
    return seed_interval([float(np.mean(t[metric])) for t in tests[name]])


def write(out: Path, s, tests: dict, records: dict, chosen: dict, timings: dict, machine: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(n) for n in s.finite.sizes]
    rows = [paired(tests, f"{v}@{n}", f"sft@{n}", m) for n in sizes for v in VARIANTS[1:] for m in METRICS]
    ablation = [paired(tests, name, f"ebft@{s.ablations.size}", m) for name in tests
                if name.startswith("ebft_") and name.endswith(f"@{s.ablations.size}") and not name.startswith("ebft_ws")
                for m in METRICS]
    controls = [paired(tests, "null: EBFT", "null: more SFT", m) for m in METRICS] + \
               [paired(tests, "positive: EBFT gamma 0", "positive: start", m) for m in METRICS] + \
               [paired(tests, "positive: EBFT gamma 0", "positive: SFT", m) for m in METRICS]
    smallest = f"sft@{sizes[0]}"
    design = [paired(tests, "yardstick", smallest, m) for m in ("cfm", "ce", "reverse_kl/G16")]
    header = ["variant", "reference", "metric", "mean", "seeds_low", "seeds_high", "units_low", "units_high"]
    for name, table in (("paired_vs_sft.csv", rows), ("ablations.csv", ablation), ("controls.csv", controls),
                        ("design_check.csv", design)):
        write_csv(out / name, header + ["per_seed"], [[r[k] for k in header] + [" ".join(f"{x:.5f}" for x in
                                                                                         r["per_seed"])] for r in table])
    levels = [[name, m, *level(tests, name, m)] for name in tests for m in METRICS]
    write_csv(out / "levels.csv", ["model", "metric", "mean", "seeds_low", "seeds_high"], levels)
    figure(out / "kl_vs_size.png", tests, sizes)
    claims = [{"variant": r["variant"], "reference": r["reference"], "metric": r["metric"], "sign": verdict_of(r)}
              for r in rows + controls + ablation if verdict_of(r) in ("lower", "higher")]
    write_json(claims, out / CLAIMS_FILE)
    text = readme(s, tests, rows, ablation, controls, design, records, chosen, timings, machine, sizes)
    write_text(out / "README.md", text)
    return {"paired": rows, "controls": controls, "design": design, "claims": claims}


def figure(path: Path, tests: dict, sizes: list[int]) -> None:
    panels = []
    for metric in HEADLINE:
        lines = []
        for v in VARIANTS:
            pts = [(n, level(tests, f"{v}@{n}", metric)[0]) for n in sizes]
            lines.append(Line(pts, NAMES[v], {"marker": "o"}))
            for n in sizes:
                _, low, high = level(tests, f"{v}@{n}", metric)
                if not math.isnan(low):
                    lines.append(Line([(n, low), (n, high)], None, {"color": "grey", "linewidth": 0.8}))
        for fixed, style in (("base", {"linestyle": ":", "color": "black"}),
                             ("yardstick", {"linestyle": "--", "color": "black"})):
            value = level(tests, fixed, metric)[0]
            lines.append(Line([(sizes[0], value), (sizes[-1], value)], fixed, style))
        panels.append(Panel(f"test {metric.replace('_kl/', ' KL, ')}", lines, "training chunks", "nats"))
    line_panels(panels, path, legend_columns=3)


def _table(rows: list[dict], label) -> str:
    return markdown_table(
        ["comparison", "metric", "mean", "95% interval over seeds", "95% interval over units", "per seed"],
        [[label(r), r["metric"], cell(r["mean"], 4), f"[{cell(r['seeds_low'], 4)}, {cell(r['seeds_high'], 4)}]",
          f"[{cell(r['units_low'], 4)}, {cell(r['units_high'], 4)}]", " ".join(f"{x:+.4f}" for x in r["per_seed"])]
         for r in rows])


def readme(s, tests, rows, ablation, controls, design, records, chosen, timings, machine, sizes) -> str:
    seeds = len(s.finite.seeds)
    main_rows = [r for r in rows if r["metric"] in HEADLINE + ("ce", "cfm")]
    verdicts = []
    for n in sizes:
        for v in VARIANTS[1:]:
            parts = [f"{m}: {verdict_of(r)} ({r['mean']:+.4f})" for r in rows
                     if r["variant"] == f"{v}@{n}" and (m := r["metric"]) in HEADLINE]
            verdicts.append(f"- {n} chunks, {NAMES[v]} vs SFT: " + "; ".join(parts))
    levels = markdown_table(["model"] + list(METRICS),
                            [[name] + [cell(level(tests, name, m)[0], 4) for m in METRICS] for name in tests])
    cfm, ce = design[0], design[1]
    cfm_low, cfm_high = (cfm["seeds_low"], cfm["seeds_high"]) if not math.isnan(cfm["seeds_low"]) else \
        (cfm["units_low"], cfm["units_high"])
    cost = sum(r["cpu_seconds"] for r in records.values())
    lines = [
        "# Known-answer bench: EBFT against SFT where the truth is exact",
        "",
        "`python -m experiments.synthetic` (settings: `experiments/synthetic/settings.yaml`). A tiny Llama "
        f"({s.model.layers} layers, hidden {s.model.hidden}) is pretrained by CE on a broad process (a mixture of "
        f"{len(s.process.seeds)} seeded hidden Markov models over {s.process.component.vocab} symbols) and then "
        f"fine-tuned on a small set of a task process made of two of the same components reweighted "
        f"({list(s.process.task_weights)}). The truth metrics are exact: the reverse KL of the model's G-token "
        "rollouts to the process and the forward KL (CE minus the process's conditional entropy on the process's "
        f"own continuations), through the process's forward filter, on {s.test.contexts} fresh test contexts with "
        f"{s.test.rollouts} rollouts each; CE on {s.test.ce_chunks} fresh test chunks; CFM at G = 8 under the "
        "base's features (the feature network of every EBFT run). All models share the test units and random numbers.",
        "",
        f"Training-set sizes {sizes} chunks of {s.chunk} symbols, {seeds} seeds each (a seed redraws the training "
        "and validation sets). SFT stops early on validation CE; EBFT from the base is chosen by the same rule; "
        "EBFT warm-started continues from SFT's chosen checkpoint; CE-only is EBFT's update with rl_coef = 0 "
        "(only gamma x CE, with EBFT's lr and step budget: EBFT - CE-only is the reward's own contribution; under "
        f"AdamW the scale gamma cancels, so CE-only is SFT with EBFT's budget). EBFT: alpha {s.ebft.alpha}, "
        f"gamma {s.ebft.gamma}, "
        f"whitening {s.ebft.whitening}, n = {s.ebft.num_samples}, C = s = {s.ebft.stride}, G = {s.ebft.gen_len}, "
        f"temperature {s.ebft.temperature}. Learning rates chosen on the first seed's validation CE: "
        + ", ".join(f"{m} {lr:g} at {n}" for (n, m), lr in sorted(chosen.items())) + ".",
        "",
        "![exact KLs against training-set size](kl_vs_size.png)",
        "",
        "Means over seeds with 95% intervals over seeds (grey); SFT's line lies under CE-only's.",
        "",
        "## Verdict",
        "",
        *verdicts,
        "",
        f"A difference is called lower or higher only when its 95% interval over seeds excludes 0 (and it is at "
        f"least {NEGLIGIBLE} nats). A per-seed difference of exactly 0 for the warm start means it never improved "
        "on SFT's validation CE, so its chosen checkpoint is SFT's.",
        "",
        "## Paired differences against SFT (variant - SFT; negative = closer to the truth)",
        "",
        _table(main_rows, lambda r: f"{r['variant']} - {r['reference']}"),
        "",
        "## Controls",
        "",
        "The converged null: from the yardstick (the base fine-tuned on plenty of task data), more SFT vs EBFT on "
        "fresh task data. The positive control: the yardstick's logits scaled by "
        f"{s.controls.positive_scale} (too flat), then EBFT with gamma = 0 for {s.controls.positive_steps} steps, "
        "against the start and against SFT from the same start (one seed; intervals over test units).",
        "",
        _table(controls, lambda r: f"{r['variant']} - {r['reference']}"),
        "",
        "## Design check: do the base's features separate a good task model from a poor one?",
        "",
        f"Yardstick - SFT at {sizes[0]} chunks: CFM {cfm['mean']:+.4f} [{cell(cfm_low, 4)}, {cell(cfm_high, 4)}], "
        f"CE {ce['mean']:+.4f} [{cell(ce['seeds_low'], 4)}, {cell(ce['seeds_high'], 4)}] nats (intervals over "
        "seeds). "
        + ("The base's features rank the yardstick clearly above small-data SFT (the interval excludes 0)."
           if cfm_high < 0 else
           "The base's features do NOT rank the yardstick clearly above small-data SFT, so this regime cannot "
           "show an effect of the feature network: the reward cannot tell the models apart."),
        "",
        "## Ablations (EBFT variants at %d chunks, variant - EBFT)" % int(s.ablations.size),
        "",
        _table(ablation, lambda r: f"{r['variant']} - {r['reference']}"),
        "",
        "## Levels (mean over seeds)",
        "",
        levels,
        "",
        "## Cost",
        "",
        f"Training CPU time of all {len(records)} runs: {cost / 60:.1f} min (each run's own, from its record). "
        "This call's stages started at (wall minutes, runs read back from disk cost nothing): "
        + ", ".join(f"{k} {v[0] / 60:.1f}" for k, v in timings.items())
        + f". Python {machine['python']}, torch {machine['torch']}, {machine['threads']} thread(s).",
        "",
    ]
    return "\n".join(lines)
