"""pareto.png: one panel per cost axis, runs and arm means, the frontiers.
"""

from __future__ import annotations

import io
import math
from pathlib import Path


from ..moe import registry
from ..tracking import atomic_write_bytes
from .humanize import human_mb, si
from .records import COST_AXES


def _tick_formatter(unit: str):
    from matplotlib import ticker

    def fmt(value, _):
        if value <= 0 and unit != "ms":
            return "0"
        return {"flops": lambda v: si(v * 1e9), "count": si, "mb": lambda v: human_mb(v).replace(" ", "\u2009"),
                "ms": lambda v: f"{v:g}"}[unit](value)

    return ticker.FuncFormatter(fmt)


def _arm_styles(arms: list[dict]) -> dict[str, tuple]:
    """A colour per arm label (the same in every panel) and a marker per router."""
    import matplotlib

    palette = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["Dark2"].colors) \
        + list(matplotlib.colormaps["Set1"].colors)
    routers = {arm["label"]: registry.find(arm["router"]) for arm in arms}
    labels = sorted(routers, key=lambda label: (routers[label].order if routers[label] else 9, label))
    return {label: (palette[i % len(palette)], routers[label].marker if routers[label] else "P")
            for i, label in enumerate(labels)}


def plot(rows: list[dict], arms: list[dict], axes: list[str], quality: str, path: Path, title: str) -> dict:
    """One panel per cost axis (and per setup): arm means with 95% error bars, the frontier over
    the means, every single run faintly behind. Returns what it drew: the legend's entries and
    per panel (setup, axis) its x scale and tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    setups = list(dict.fromkeys(arm["setup"] for arm in arms))
    ncols = min(3, len(axes))
    per_setup = math.ceil(len(axes) / ncols)
    styles = _arm_styles(arms)
    legend_rows = math.ceil((len(styles) + 3) / 3)
    fig, grid = plt.subplots(per_setup * len(setups), ncols, squeeze=False,
                             figsize=(4.8 * ncols, 3.7 * per_setup * len(setups) + 0.22 * legend_rows + 0.5))
    quality_name = "test top-1 (%)" if quality == "top1" else "test top-1 at the best val epoch (%)"
    if quality == "val_top1_best":
        quality_name = "best validation top-1 (%)"
    if quality.startswith("probe."):
        quality_name = f"{quality.split('.')[-1]} linear probe on {quality.split('.')[1]}, top-1 (%)"
    for s, setup in enumerate(setups):
        for a, axis in enumerate(axes):
            ax = grid[s * per_setup + a // ncols][a % ncols]
            spec = COST_AXES[axis]
            for row in (r for r in rows if r["setup"] == setup):
                color, marker = styles[row["label"]]
                ax.scatter(row[axis], 100 * row[quality], color=color, marker=marker, s=16, alpha=0.25,
                           linewidths=0, zorder=1)
            own = [arm for arm in arms if arm["setup"] == setup]
            for arm in own:
                color, marker = styles[arm["label"]]
                ci = arm[f"{quality}_ci95"]
                ax.errorbar(arm[f"{axis}_mean"], 100 * arm[f"{quality}_mean"],
                            yerr=None if ci is None else 100 * ci, fmt=marker, color=color, ms=7, capsize=3,
                            elinewidth=1.2, markeredgecolor="white", markeredgewidth=0.6, zorder=3)
            front = sorted((arm[f"{axis}_mean"], 100 * arm[f"{quality}_mean"]) for arm in own
                           if arm[f"frontier_{axis}"])
            if front:
                ax.step(*zip(*front), where="post", color="gray", lw=1, ls="--", zorder=2)
                ax.scatter(*zip(*front), s=170, facecolors="none", edgecolors="gray", linewidths=1, zorder=2)
            xs = [row[axis] for row in rows if row["setup"] == setup and row[axis] > 0]
            wide = bool(xs) and max(xs) / min(xs) > 10  # a log axis over a narrow range only hides ticks
            if wide:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            else:
                ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
            ax.xaxis.set_major_formatter(_tick_formatter(spec.unit))
            ax.set_xlabel(f"{spec.label}{' (log)' if wide else ''}")
            ax.set_ylabel(quality_name)
            ax.grid(alpha=0.3)
            if setup:
                ax.set_title(setup, fontsize=8)
        for a in range(len(axes), per_setup * ncols):
            grid[s * per_setup + a // ncols][a % ncols].set_visible(False)
    handles = [Line2D([], [], color=color, marker=marker, ls="", ms=7, label=label)
               for label, (color, marker) in styles.items()]
    handles += [
        Line2D([], [], color="gray", marker="o", ls="", ms=4, alpha=0.35, label="single run (one per seed)"),
        Line2D([], [], color="black", marker="|", ls="", ms=10, label="arm mean, bar = 95% t-interval over seeds"),
        Line2D([], [], color="gray", ls="--", marker="o", ms=11, markerfacecolor="none",
               label="frontier over arm means (ringed)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: quality vs cost")
    legend_height = (0.22 * legend_rows + 0.15) / fig.get_figheight()
    fig.tight_layout(rect=(0, legend_height, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Software": None})  # no version stamp: reruns give the same file
    atomic_write_bytes(path, png.getvalue())
    drawn = {"legend": [h.get_label() for h in handles], "panels": {}}
    for s, setup in enumerate(setups):
        for a, axis in enumerate(axes):
            ax = grid[s * per_setup + a // ncols][a % ncols]
            drawn["panels"][(setup, axis)] = {
                "xscale": ax.get_xscale(), "ylabel": ax.get_ylabel(),
                "xticks": [t.get_text() for t in ax.get_xticklabels() if t.get_text()]}
    plt.close(fig)
    return drawn
