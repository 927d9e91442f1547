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

from ebft.reporting import Line, Panel, ProfileCurve, line_panels, profile_plot, pyplot, save_figure
from experiments.collect import load_run
from experiments.repro.comparison import curve

CURVES = (("val/ce", "validation CE"), ("val/cfm", "validation CFM"), ("train/ce", "training CE (batch)"))


def _variants(models: list[dict]) -> list[str]:
    return list(dict.fromkeys(m["variant"] for m in models))


def fm_profile(models: list[dict], path: Path, title: str) -> Path | None:
    """Write the FM-profile plot of the models that have a profile; None when none has."""
    curves = []
    for variant in _variants(models):
        profiles = [m["profile"]["profile"] for m in models if m["variant"] == variant
                    and m.get("profile") and m["profile"].get("profile")]
        if not profiles:
            continue
        lengths = profiles[0]["G"]
        means = [sum(c["cfm"][i] for c in profiles) / len(profiles) for i in range(len(lengths))]
        errors = [math.sqrt(sum((c["se"][i] or 0.0) ** 2 for c in profiles)) / len(profiles)
                  for i in range(len(lengths))]
        label = next(m["label"] for m in models if m["variant"] == variant)
        style = {"linestyle": "--", "color": "black"} if variant == "base" else {}
        curves.append(ProfileCurve(f"{label} (n={len(profiles)})", lengths, means, errors, style))
    return profile_plot(curves, path, title, ylabel="held-out CFM (lower is better)")


def _series(directory: Path, key: str) -> list[tuple[int, float]]:
    if not (directory / "metrics.csv").is_file():
        return []
    return [(s, v) for s, v in load_run(directory).series(key) if math.isfinite(v)]


def training_curves(out: Path, models: list[dict], path: Path) -> Path | None:
    """Write the training-curve plot of the trained models; None when no run has a metrics.csv."""
    trained = [m for m in models if m["variant"] != "base"]
    colours = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    panels = []
    for key, title in CURVES:
        lines = []
        for i, variant in enumerate(_variants(trained)):
            runs = [r for m in trained if m["variant"] == variant if (r := _series(out / m["dir"], key))]
            if not runs:
                continue
            colour = colours[i % len(colours)]
            lines += [Line(r, None, {"color": colour, "alpha": 0.35, "linewidth": 0.8}) for r in runs]
            steps = sorted(set.intersection(*(set(s for s, _ in r) for r in runs)))
            mean = [(s, sum(dict(r)[s] for r in runs) / len(runs)) for s in steps]
            label = next(m["label"] for m in trained if m["variant"] == variant)
            lines.append(Line(mean, label, {"color": colour, "linewidth": 2, "marker": "o", "markersize": 3}))
        panels.append(Panel(title, lines))
    return line_panels(panels, path, legend_columns=4)


def cfm_curves(out: Path, models: list[dict], plan: dict, path: Path) -> Path | None:
    """Write ``cfm_curves.png`` (module docstring); None when no run has logged a change yet."""
    plt = pyplot()
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
    return save_figure(fig, path)
