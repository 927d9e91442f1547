"""Training statistics from the runs' ``metrics.csv`` and the diagnosis built on them.

Every number here is computed from the CSV logs (``train/*``, ``val/*``, ``perf/*``) and the
``job.json`` wall times of the run directories: first and last quarter of the steps for trends,
means over the steps otherwise, then means over the seeds. The diagnosis states what those numbers
say about why EBFT did or did not beat SFT; it has no hand-written numbers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ebft.reporting import cell
from experiments.collect import Run, load_run
from experiments.repro import comparison
from experiments.repro.jobs import read_record

PAPER_ROLLOUTS_PER_STEP = 16 * 127 * 4   # docs/authors_code.md: 16 chunks x 127 blocks (T=1024, C=s=G=8) x n=4
PAPER_LR = 1e-6
TRAIN_KEYS = ("train/reward", "train/reward_std", "train/advantage_std", "train/alignment", "train/diversity",
              "train/duplicate_fraction", "train/zero_signal_fraction", "train/cfm", "train/ce", "train/pg",
              "train/completion_len", "perf/sample_s")


def mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def quarters(series: list[tuple[int, float]]) -> tuple[float, float]:
    """Means of the first and the last quarter (at least one value each) of a (step, value) series."""
    values = [v for _, v in series if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    k = max(1, len(values) // 4)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


@dataclass(frozen=True)
class RunStats:
    """What one run's metrics.csv and job.json say."""

    steps: int
    seconds: float
    means: dict[str, float]            # train/perf key -> mean over the steps
    trend: dict[str, tuple[float, float]]  # key -> (first quarter, last quarter), val keys: (first, last)
    step_sd: dict[str, float]          # train key -> sd over the steps

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps and math.isfinite(self.seconds) else math.nan


def run_stats(directory: Path) -> RunStats | None:
    """The statistics of the run in ``directory`` (None when it has no metrics.csv)."""
    if not (directory / "metrics.csv").is_file():
        return None
    run: Run = load_run(directory)
    record = read_record(directory) or {}
    means, trend, sd = {}, {}, {}
    for key in TRAIN_KEYS:
        series = run.series(key)
        if series:
            values = [v for _, v in series]
            means[key] = mean(values)
            trend[key] = quarters(series)
            sd[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    for key in ("val/ce", "val/cfm", "val/cfm_se"):
        series = run.series(key)
        if series:
            trend[key] = (series[0][1], series[-1][1])
    return RunStats(run.steps, float(record.get("seconds", math.nan)), means, trend, sd)


def variant_runs(out: Path, models: list[dict], variant: str) -> list[RunStats]:
    stats = [run_stats(out / m["dir"]) for m in models if m["variant"] == variant]
    return [s for s in stats if s is not None]


def mean_trend(runs: list[RunStats], key: str) -> tuple[float, float]:
    pairs = [r.trend[key] for r in runs if key in r.trend]
    return mean(p[0] for p in pairs), mean(p[1] for p in pairs)


def mean_of(runs: list[RunStats], key: str) -> float:
    return mean(r.means.get(key) for r in runs)


def stats_table(out: Path, plan: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per trained variant) of the training statistics, means over seeds."""
    header = ["variant", "s/step", "reward (first→last ¼)", "reward sd", "advantage sd", "alignment", "diversity",
              "duplicates", "zero-signal groups", "train CE (first→last ¼)", "val CE (start→end)",
              "val CFM (start→end)"]
    rows = []
    for name, variant in plan["variants"].items():
        runs = variant_runs(out, plan["models"], name)
        if not runs:
            continue

        def arrow(key: str) -> str:
            return "→".join(cell(v) for v in mean_trend(runs, key)) if any(key in r.trend for r in runs) else "–"

        rows.append([variant["label"], cell(mean(r.seconds_per_step for r in runs), 1), arrow("train/reward"),
                     cell(mean_of(runs, "train/reward_std")), cell(mean_of(runs, "train/advantage_std")),
                     cell(mean_of(runs, "train/alignment")), cell(mean_of(runs, "train/diversity")),
                     cell(mean_of(runs, "train/duplicate_fraction"), 2),
                     cell(mean_of(runs, "train/zero_signal_fraction"), 2), arrow("train/ce"), arrow("val/ce"),
                     arrow("val/cfm")])
    return header, rows


def _profile_gap(models: list[dict], a: str, b: str) -> list[tuple[int, float]]:
    """(G, mean CFM of variant a - variant b) over the FM profile lengths both have."""
    def profile(variant):
        curves = [m["profile"]["profile"] for m in models
                  if m["variant"] == variant and m.get("profile") and m["profile"].get("profile")]
        if not curves:
            return {}
        return {g: mean(c["cfm"][i] for c in curves) for i, g in enumerate(curves[0]["G"])}
    pa, pb = profile(a), profile(b)
    return [(g, pa[g] - pb[g]) for g in pa if g in pb]


@dataclass(frozen=True)
class Evidence:
    """What the findings read: the runs of the EBFT variant, of SFT and of RLVR, and the plan."""

    out: Path
    plan: dict
    models: list[dict]
    ebft: str
    e_runs: list[RunStats]
    s_runs: list[RunStats]
    r_runs: list[RunStats]

    @property
    def knobs(self) -> dict:
        return self.plan["variants"][self.ebft]["knobs"]

    @property
    def sizes(self) -> dict:
        return self.plan["sizes"]


def cfm_finding(ev: Evidence) -> str | None:
    cfm0, cfm1 = mean_trend(ev.e_runs, "val/cfm")
    se = mean_trend(ev.e_runs, "val/cfm_se")[1]
    if not (math.isfinite(cfm0) and math.isfinite(cfm1)):
        return None
    noise = 2 * math.sqrt(2) * se if math.isfinite(se) else math.nan
    moved = "within" if abs(cfm1 - cfm0) <= noise else "beyond"
    return (f"**CFM signal vs noise.** Over {ev.e_runs[0].steps} steps the in-training val CFM of EBFT went "
            f"{cell(cfm0)} → {cell(cfm1)} (Δ {cfm1 - cfm0:+.4f}), {moved} twice the standard error of a "
            f"difference of two estimates (±{cell(noise, 4)}, {ev.sizes['in_training_cfm_chunks']} chunks).")


def reward_finding(ev: Evidence) -> str | None:
    r0, r1 = mean_trend(ev.e_runs, "train/reward")
    step_sd = mean(r.step_sd.get("train/reward") for r in ev.e_runs)
    if not math.isfinite(r0):
        return None
    k = max(1, ev.e_runs[0].steps // 4)
    noise = 2 * step_sd * math.sqrt(2 / k) if math.isfinite(step_sd) else math.nan
    trend = "no trend beyond its step-to-step noise" if abs(r1 - r0) <= noise else ("a rise" if r1 > r0 else "a fall")
    return (f"**Training reward.** Batch-mean feature-matching reward {cell(r0)} (first quarter) → {cell(r1)} "
            f"(last quarter): {trend} (±{cell(noise)}; it varies by {cell(step_sd)} between steps because every "
            "step draws new chunks).")


def advantage_finding(ev: Evidence) -> str | None:
    adv, rsd = mean_of(ev.e_runs, "train/advantage_std"), mean_of(ev.e_runs, "train/reward_std")
    n = int(ev.knobs.get("num_samples", 0))
    if not (math.isfinite(adv) and math.isfinite(rsd) and rsd > 0 and n > 1):
        return None
    within = min(1.0, ((n - 1) / n * adv / rsd) ** 2)
    return (f"**Advantages.** RLOO advantage sd {cell(adv)} vs reward sd {cell(rsd)} within a batch: leave-one-out "
            f"advantages are n/(n-1) × (reward − context mean), so about {within:.0%} of the reward variance is "
            f"between the {n} samples of a context (the signal the policy gradient follows) and {1 - within:.0%} "
            "between contexts (removed by the baseline).")


def diversity_finding(ev: Evidence) -> str | None:
    div = mean_of(ev.e_runs, "train/diversity")
    if not (math.isfinite(div) and abs(div) < 1e-6 and ev.knobs.get("whitening", "none") != "none"):
        return None
    alphas = sorted({v["knobs"].get("alpha") for v in ev.plan["variants"].values() if v["method"] == "ebft"})
    return ("**Diversity term.** The whitened diversity reward was 0 at every step: whitening makes distinct "
            "rollouts orthonormal, so only duplicates are penalised. With no duplicates the reward is alignment "
            f"only and alpha ({', '.join(f'{a:g}' for a in alphas)}) changes nothing: EBFT variants that differ "
            "only in alpha train identically.")


def duplicate_finding(ev: Evidence) -> str | None:
    dup = mean_of(ev.e_runs, "train/duplicate_fraction")
    if not math.isfinite(dup):
        return None
    reading = ("many samples repeat another one of their context: fewer distinct rollouts per context, and "
               "whitening then gives those duplicates a diversity penalty" if dup > 0.25 else
               "duplicates are rare, so the n samples are distinct and diversity is not the bottleneck")
    return (f"**Duplicates.** {dup:.0%} of rollouts duplicate another sample of the same context (temperature "
            f"{ev.knobs.get('temperature', '?')}, G={ev.sizes['gen_len']}): {reading}.")


def ce_finding(ev: Evidence) -> str | None:
    lr_e, lr_s = ev.plan["lr"].get("ebft"), ev.plan["lr"].get("sft")
    gamma = ev.knobs.get("gamma")
    if not (lr_e and lr_s and gamma is not None):
        return None
    ce_e = mean_trend(ev.e_runs, "val/ce")
    ce_s = mean_trend(ev.s_runs, "val/ce") if ev.s_runs else (math.nan, math.nan)
    return (f"**Cross-entropy.** EBFT's CE term has weight γ={gamma:g} at lr {lr_e:g}, SFT's is the whole loss at "
            f"lr {lr_s:g}: EBFT's direct CE gradient step is {gamma * lr_e / lr_s:.3f}× SFT's (over all chunk "
            f"tokens; SFT's over answer tokens). In-training val CE moved {ce_e[1] - ce_e[0]:+.3f} for EBFT and "
            f"{ce_s[1] - ce_s[0]:+.3f} for SFT.")


def budget_finding(ev: Evidence) -> str:
    z, n = ev.sizes, int(ev.knobs.get("num_samples", 0))
    steps, per_step = ev.e_runs[0].steps, z["batch_size"] * z["blocks"] * n
    return (f"**Budget and horizon.** {steps} steps × {z['batch_size']} chunks × {z['blocks']} contexts × {n} "
            f"samples = {steps * per_step:,} rollouts of G={z['gen_len']} tokens in all ({per_step} per step, lr "
            f"{ev.plan['lr'].get('ebft', math.nan):g}); the paper's recipe takes {PAPER_ROLLOUTS_PER_STEP:,} "
            f"rollouts per step at lr {PAPER_LR:g} for 2 epochs of 100k examples, "
            f"{PAPER_ROLLOUTS_PER_STEP / max(per_step, 1):.0f}× more per step and thousands of steps.")


def _change(ev: Evidence, variant: str, which: str) -> tuple[float, float, int] | None:
    """(change, se, chunks seen) of the in-training CFM since the start, mean over the variant's runs:
    ``which`` is "val" (held-out chunks) or "train" (the run's first training chunks)."""
    curves = comparison.variant_curves(ev.out, ev.models, variant, int(ev.sizes["batch_size"]))
    return comparison.final_changes(curves).get(which) if curves else None


def _moved(change: tuple[float, float, int]) -> str:
    """A change with its standard error and whether it is beyond two of them."""
    value, se, _ = change
    word = "lower" if value < -2 * se else "higher" if value > 2 * se else "within noise"
    return f"{value:+.4f} ± {se:.4f} ({word})"


def curves_finding(ev: Evidence) -> str | None:
    """How each method moved in-sample and held-out CFM, against two standard errors."""
    parts = []
    for label, variant in (("SFT", "sft"), ("EBFT", ev.ebft)):
        val, train = _change(ev, variant, "val"), _change(ev, variant, "train")
        if val is None or train is None:
            return None
        parts.append(f"{label} in-sample {_moved(train)}, held-out {_moved(val)}")
    return (f"**In-sample vs held-out.** CFM change after one pass over the run's chunks (two standard errors "
            f"decide the word): {parts[0]}; {parts[1]}. Lowering the first without the second is memorising.")


def trend_finding(ev: Evidence) -> str | None:
    """What the held-out curves say about the budget EBFT would need to pass SFT.

    The rate is EBFT's held-out CFM change minus SFT's, per 100 training chunks, with the standard error
    of the two (independent) changes; the gap is the paired EBFT - SFT FM of the final comparison. A
    linear extrapolation is the most the curves allow: it says whether more chunks at this lr point
    toward EBFT passing SFT, and roughly how many, not that they would.
    """
    e, s = _change(ev, ev.ebft, "val"), _change(ev, "sft", "val")
    if e is None or s is None:
        return None
    (de, se_e, chunks), (ds, se_s, _) = e, s
    rate, se = 100 * (de - ds) / chunks, 100 * math.hypot(se_e, se_s) / chunks
    best, worst = rate - 2 * se, rate + 2 * se
    text = (f"**Trend and budget.** Over {chunks} training chunks EBFT's held-out CFM changed {de - ds:+.4f} "
            f"relative to SFT's: {rate:+.4f} ± {se:.4f} per 100 chunks.")
    rose = [label for label, (d, sd) in (("SFT", (ds, se_s)), ("EBFT", (de, se_e))) if d > 2 * sd]
    if rose:
        text += (f" {' and '.join(rose)} raised held-out CFM beyond noise: more steps at this lr move "
                 f"{'both' if len(rose) == 2 else 'it'} the wrong way.")
    fm = comparison.compare(ev.models, ev.ebft, "sft", "FM", "calibration", "cfm")
    if fm is None:
        return text
    gap = fm.diff.mean
    if gap <= 0:
        return text + f" On the comparison's held-out contexts EBFT is already {gap:+.4f} below SFT."
    text += f" On the comparison's held-out contexts EBFT is {gap:+.4f} above SFT."
    if worst < 0:
        return text + (f" At that rate EBFT would pass SFT after about {100 * gap / -rate:,.0f} more chunks "
                       f"({100 * gap / -best:,.0f} to {100 * gap / -worst:,.0f} within two standard errors).")
    if best >= 0:
        return text + (f" Even the most favourable rate within two standard errors ({best:+.4f} per 100 chunks) "
                       "does not fall: the curves point to no budget at this lr and batch in which EBFT passes SFT.")
    return text + (f" The rate is within noise of zero (two standard errors: {best:+.4f} to {worst:+.4f} per 100 "
                   f"chunks), so these curves cannot say whether EBFT gains on SFT with more chunks: at the most "
                   f"favourable rate it would pass SFT after about {100 * gap / -best:,.0f} more chunks, at a rate "
                   "of zero or above never.")


def rlvr_finding(ev: Evidence) -> str | None:
    zero = mean_of(ev.r_runs, "train/zero_signal_fraction")
    if not math.isfinite(zero):
        return None
    reading = "it learned almost nothing at this scale" if zero > 0.9 else "its gradient comes from the other groups"
    return (f"**RLVR for comparison.** Pass rate of its training completions "
            f"{cell(mean_of(ev.r_runs, 'train/reward'))}; {zero:.0%} of prompt groups had all-equal rewards and so "
            f"zero advantage: {reading}.")


def profile_finding(ev: Evidence) -> str | None:
    gap = _profile_gap(ev.models, ev.ebft, "sft")
    if not gap:
        return None
    text = ", ".join(f"G={g}: {d:+.4f}" for g, d in gap)
    return (f"**FM profile.** EBFT − SFT CFM by completion length (negative = EBFT better): {text}; training used "
            f"G={ev.sizes['gen_len']}.")


FINDINGS = (cfm_finding, reward_finding, advantage_finding, diversity_finding, duplicate_finding, ce_finding,
            budget_finding, curves_finding, trend_finding, rlvr_finding, profile_finding)


def diagnose(out: Path, plan: dict, models: list[dict], ebft: str) -> list[str]:
    """Findings (markdown bullet texts) on the EBFT variant ``ebft`` against SFT, from the logs."""
    e_runs = variant_runs(out, models, ebft)
    if not e_runs:
        return [f"No metrics.csv of {ebft} runs: nothing to diagnose."]
    rlvr = next((n for n, v in plan["variants"].items() if v["method"] == "rlvr"), None)
    ev = Evidence(out, plan, models, ebft, e_runs, variant_runs(out, models, "sft"),
                  variant_runs(out, models, rlvr) if rlvr else [])
    return [text for finding in FINDINGS if (text := finding(ev))]
