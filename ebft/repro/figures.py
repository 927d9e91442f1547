"""The report's figures (matplotlib, Agg backend): the FM profile and the training curves.

- ``fm_profile.png``: held-out CFM against completion length G (paper Figure 2), one curve per
  variant (mean over seeds; error bars: the CFM estimate's standard error of that mean);
- ``training_curves.png``: validation CE and CFM and the training CE over optimizer steps, from each
  run's ``metrics.csv`` (paper Figure 3): thin lines per seed, a thick line for the seed mean;
- ``cfm_curves.png``: the paired change of CFM since the start of each run, in-sample (the run's first
  training chunks) and held-out, against training chunks seen, with standard-error bars.
"""

from __future__ import annotations

import math
from pathlib import Path

from ebft.collect import load_run
from ebft.repro.comparison import curve

CURVES = (("val/ce", "validation CE"), ("val/cfm", "validation CFM"), ("train/ce", "training CE (batch)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variants(models: list[dict]) -> list[str]:
    return list(dict.fromkeys(m["variant"] for m in models))


def fm_profile(models: list[dict], path: Path, title: str) -> Path | None:
    """Write the FM-profile plot of the models that have a profile; None when none has."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for variant in _variants(models):
        curves = [m["profile"]["profile"] for m in models if m["variant"] == variant
                  and m.get("profile") and m["profile"].get("profile")]
        if not curves:
            continue
        lengths = curves[0]["G"]
        means = [sum(c["cfm"][i] for c in curves) / len(curves) for i in range(len(lengths))]
        errors = [math.sqrt(sum((c["se"][i] or 0.0) ** 2 for c in curves)) / len(curves) for i in range(len(lengths))]
        label = next(m["label"] for m in models if m["variant"] == variant)
        style = {"linestyle": "--", "color": "black"} if variant == "base" else {}
        ax.errorbar(lengths, means, yerr=errors, marker="o", capsize=3, label=f"{label} (n={len(curves)})", **style)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(g) for g in lengths])
    ax.set_xlabel("completion length G (tokens)")
    ax.set_ylabel("held-out CFM (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(directory: Path, key: str) -> list[tuple[int, float]]:
    if not (directory / "metrics.csv").is_file():
        return []
    return [(s, v) for s, v in load_run(directory).series(key) if math.isfinite(v)]


def training_curves(out: Path, models: list[dict], path: Path) -> Path | None:
    """Write the training-curve plot of the trained models; None when no run has a metrics.csv."""
    plt = _pyplot()
    trained = [m for m in models if m["variant"] != "base"]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for ax, (key, title) in zip(axes, CURVES):
        for i, variant in enumerate(_variants(trained)):
            runs = [_series(out / m["dir"], key) for m in trained if m["variant"] == variant]
            runs = [r for r in runs if r]
            if not runs:
                continue
            colour = colours[i % len(colours)]
            for r in runs:
                ax.plot(*zip(*r), color=colour, alpha=0.35, linewidth=0.8)
            steps = sorted(set.intersection(*(set(s for s, _ in r) for r in runs)))
            if steps:
                mean = [sum(dict(r)[s] for r in runs) / len(runs) for s in steps]
                label = next(m["label"] for m in trained if m["variant"] == variant)
                ax.plot(steps, mean, color=colour, linewidth=2, marker="o", markersize=3, label=label)
            drawn = True
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def cfm_curves(out: Path, models: list[dict], plan: dict, path: Path) -> Path | None:
    """Write ``cfm_curves.png`` (module docstring); None when no run has logged a change yet."""
    plt = _pyplot()
    batch = int(plan["sizes"]["batch_size"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    trained = [m for m in models if m["variant"] != "base" and m.get("dir")]
    for i, variant in enumerate(_variants(trained)):
        label = next(m["label"] for m in trained if m["variant"] == variant)
        for m in (m for m in trained if m["variant"] == variant):
            c = curve(out / m["dir"], batch)
            if c is None:
                continue
            for ax, points in zip(axes, (c.train, c.val)):
                ax.errorbar(c.chunks, [v for v, _ in points], yerr=[0 if math.isnan(s) else 1.96 * s for _, s in points],
                            color=colours[i % len(colours)], marker="o", markersize=3, capsize=2,
                            label=f"{label}, seed {m.get('seed')}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("in-sample: the run's first training chunks", "held-out validation chunks")):
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("training chunks seen")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CFM change since the start (paired, 95% CI)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
