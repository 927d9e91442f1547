"""Tables, plots, the claimed orderings and ``README.md`` of the synthetic testbed.

Every comparison is paired over held-out units with :func:`ebft.eval.paired.paired_difference`: test
chunks for CE and CFM (the blocks of one chunk share text, so a chunk's contexts are averaged first),
oracle contexts (independent draws of the process) for the oracle error. A variant's per-unit value is
its mean over the seeds, so the interval is over held-out contexts at the seeds run.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from ebft import files
from ebft.eval.paired import paired_difference

STATS = ("pairs", "unigram")
CLAIMS_FILE = "claims.json"


def per_chunk(values) -> np.ndarray:
    """(chunks, blocks) nested list -> per-chunk means; a flat list is already per chunk."""
    array = np.asarray(values, dtype=np.float64)
    return array.mean(axis=-1) if array.ndim == 2 else array


def units(record: dict) -> dict[str, np.ndarray]:
    """The per-unit arrays of one test record: ``ce``, ``cfm``, ``oracle/<stat>/G<g>`` (l2)."""
    out = {"ce": per_chunk(record["units"]["ce"]), "cfm": per_chunk(record["units"]["cfm"])}
    for g, per in record["oracle"].items():
        for stat in STATS:
            out[f"oracle/{stat}/G{g}"] = np.asarray(per[stat]["l2"])
            out[f"tv/{stat}/G{g}"] = np.asarray(per[stat]["tv"])
    for g, values in record["units"]["profile"].items():
        out[f"profile/G{g}"] = per_chunk(values)
    return out


def seed_mean(records: list[dict]) -> dict[str, np.ndarray]:
    """Per-unit values averaged over the seeds' records (same units in every record)."""
    per_seed = [units(r) for r in records]
    return {k: np.mean([u[k] for u in per_seed], axis=0) for k in per_seed[0]}


def paired_rows(tests: dict[str, list[dict]], reference: str, keys: list[str]) -> list[dict]:
    """``variant - reference`` for every other variant and key (seed means, paired over units); a
    reference with one record (the base) is every seed's reference."""
    ref = seed_mean(tests[reference])
    rows = []
    for name, records in tests.items():
        if name == reference:
            continue
        mean = seed_mean(records)
        for key in keys:
            d = paired_difference(mean[key], ref[key], n_permutations=10_000, seed=0)
            per_seed = [float(np.mean(units(r)[key] - units(q)[key]))
                        for r, q in zip(records, itertools.cycle(tests[reference]))]
            rows.append({"variant": name, "reference": reference, "metric": key, "mean": d.mean, "se": d.se,
                         "ci_low": d.ci_low, "ci_high": d.ci_high, "p_value": d.p_value, "n": d.n,
                         "per_seed": per_seed})
    return rows


def claims_of(rows: list[dict]) -> list[dict]:
    """The orderings the report claims: every comparison whose 95% interval excludes 0 and whose
    difference has that sign at every seed, with its sign."""
    def holds(r):
        lower, higher = r["ci_high"] < 0, r["ci_low"] > 0
        return (lower and all(v < 0 for v in r["per_seed"])) or (higher and all(v > 0 for v in r["per_seed"]))

    return [{"variant": r["variant"], "reference": r["reference"], "metric": r["metric"],
             "sign": "lower" if r["ci_high"] < 0 else "higher"} for r in rows if holds(r)]


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV (list cells as JSON), atomically."""
    files.write_csv(path, list(rows[0]), [[json.dumps(v) if isinstance(v, list) else v for v in row.values()]
                                          for row in rows])


def summary_rows(tests: dict[str, list[dict]], truth: dict, horizons: list[int]) -> list[dict]:
    """One row per model (seed mean): test CE, CFM, oracle l2 (pairs) at each horizon; and the truth."""
    rows = []
    for name, records in tests.items():
        mean = seed_mean(records)
        row = {"model": name, "seeds": len(records), "ce": mean["ce"].mean(), "cfm": mean["cfm"].mean()}
        for g in horizons:
            row[f"oracle_pairs_G{g}"] = mean[f"oracle/pairs/G{g}"].mean()
        for g in horizons:
            row[f"tv_pairs_G{g}"] = mean[f"tv/pairs/G{g}"].mean()
        rows.append(row)
    row = {"model": "true process", "seeds": 0, "ce": float("nan"), "cfm": float("nan")}
    for g in horizons:
        row[f"oracle_pairs_G{g}"] = float(np.mean(truth[str(g)]["pairs"]["l2"]))
    for g in horizons:
        row[f"tv_pairs_G{g}"] = float(np.mean(truth[str(g)]["pairs"]["tv"]))
    rows.append(row)
    return rows


def plot_curves(path: Path, curves: dict[str, list[dict]]) -> None:
    """Validation CE and CFM over training steps, one line per variant (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("val/cfm", "val/ce")):
        for name, runs in curves.items():
            steps = [s for s, _ in runs[0][key]]
            values = np.mean([[v for _, v in run[key]] for run in runs], axis=0)
            ax.plot(steps, values, marker="o", label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key + " (validation split)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_horizons(path: Path, tests: dict[str, list[dict]], horizons: list[int], truth: dict) -> None:
    """Oracle error (pairs and unigram, l2) and the CFM profile against the horizon G."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, records in tests.items():
        mean = seed_mean(records)
        for ax, stat in zip(axes[:2], STATS):
            ax.plot(horizons, [mean[f"oracle/{stat}/G{g}"].mean() for g in horizons], marker="o", label=name)
        lengths = sorted(int(k[len("profile/G"):]) for k in mean if k.startswith("profile/G"))
        axes[2].plot(lengths, [mean[f"profile/G{g}"].mean() for g in lengths], marker="o", label=name)
    for ax, stat in zip(axes[:2], STATS):
        ax.plot(horizons, [np.mean(truth[str(g)][stat]["l2"]) for g in horizons], "k--", label="true process")
        ax.set_title(f"oracle error ({stat}), squared L2")
    axes[2].set_title("CFM profile (feature network of the base)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("horizon G (tokens)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_claims(out: Path, claims: list[dict]) -> None:
    files.write_text(out / CLAIMS_FILE, json.dumps(claims, indent=1) + "\n")
