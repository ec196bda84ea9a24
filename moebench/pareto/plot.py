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

MIN_SEEDS = 3  # fewer seeds: the arm's mark is hollow (a 2-seed t-interval is +-12.7 std; 1 seed has none)


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
    bars: dict[tuple, tuple] = {}  # (setup, axis, arm) -> the error bar as drawn (percent), for the caller
    ncols = min(3, len(axes))
    per_setup = math.ceil(len(axes) / ncols)
    styles = _arm_styles(arms)
    few_seeds = any(arm.get("seeds") is not None and arm["seeds"] < MIN_SEEDS for arm in arms)
    legend_cols = 3 if ncols > 1 else 1  # one panel is too narrow for 3 columns of entries
    legend_rows = math.ceil((len(styles) + 3 + few_seeds) / legend_cols)
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
                mean, ci = 100 * arm[f"{quality}_mean"], arm[f"{quality}_ci95"]
                # A t-interval of 2 seeds is +-12.7 standard deviations: drawn whole it ran from -60% to
                # 110% and flattened every arm into one band. A top-1 lies in [0, 100]: so do its bars.
                low, high = (None, None) if ci is None else (max(0.0, mean - 100 * ci), min(100.0, mean + 100 * ci))
                bars[(setup, axis, arm["label"])] = (low, high)
                few = arm.get("seeds") is not None and arm["seeds"] < MIN_SEEDS
                ax.errorbar(arm[f"{axis}_mean"], mean, yerr=None if ci is None else [[mean - low], [high - mean]],
                            fmt=marker, color=color, ms=7, capsize=3, elinewidth=1.2, zorder=3,
                            markerfacecolor="white" if few else color,  # hollow: too few seeds to trust the bar
                            markeredgecolor=color if few else "white", markeredgewidth=1.2 if few else 0.6)
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
    if few_seeds:
        handles.append(Line2D([], [], color="gray", marker="o", ls="", ms=7, markerfacecolor="white",
                              label=f"hollow: fewer than {MIN_SEEDS} seeds (interval unreliable or none)"))
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    fig.suptitle(title)
    legend_height = (0.22 * legend_rows + 0.15) / fig.get_figheight()
    fig.tight_layout(rect=(0, legend_height, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Software": None})  # no version stamp: reruns give the same file
    atomic_write_bytes(path, png.getvalue())
    drawn = {"legend": [h.get_label() for h in handles], "panels": {}, "bars": bars, "title": title}
    for s, setup in enumerate(setups):
        for a, axis in enumerate(axes):
            ax = grid[s * per_setup + a // ncols][a % ncols]
            drawn["panels"][(setup, axis)] = {
                "xscale": ax.get_xscale(), "ylabel": ax.get_ylabel(),
                "xticks": [t.get_text() for t in ax.get_xticklabels() if t.get_text()]}
    plt.close(fig)
    return drawn
