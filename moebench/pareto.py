"""Cost/quality Pareto frontiers over finished runs: files, terminal tables, a W&B run.

Reads run records (``result.json``) only; it never imports the training code (arm labels come from
the routers' own descriptions, moe/registry.py).
Used by ``moebench pareto PATH...`` and by ``ParetoCallback`` at the end of
every ``-m`` sweep.

The frontier of a set of points, for one cost axis: a point is on it unless
another is at least as cheap AND at least as good, and strictly better on one of
the two. So two points at the same place are both on it (neither beats the
other), and of two equally cheap points only the better one is.

Runs that differ only in ``seed`` form an *arm*; arms carry the mean, standard
deviation and 95% t-interval of their quality, and the arm frontier is computed
on the means. Runs trained on different data, models or schedules (a different
*setup*) never share a frontier: the command refuses to mix them unless asked,
then draws one frontier per setup.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from . import checkpoint, distributed, report, schema, status
from .moe import registry
from .schema import flatten
from .stats import ci95_half_width, welch_ci95
from .tracking import atomic_write_bytes, atomic_write_json, sweep_group

QUALITY = "top1"  # the final model's test top-1
PARETO_LOCK = ".moebench.pareto.lock"
QUALITIES = ("top1", "top1_at_best_val", "val_top1_best")  # val_top1_best: what a search (search.objectives) sees


@dataclass(frozen=True)
class Axis:
    label: str
    unit: str  # how values print: flops (given in GFLOPs), count, ms, mb
    value: Callable[[dict], float]  # read off a run's cost record


# Cost axes, all "lower is cheaper" (training speed becomes ms per image). Memory axes are
# used when every run has them (older records lack them).
COST_AXES = {
    "gflops_per_image": Axis("FLOPs / image", "flops", lambda c: c["gflops_per_image"]),
    "params_total": Axis("parameters", "count", lambda c: c["params_total"]),
    "infer_ms_per_image": Axis("inference ms / image", "ms", lambda c: c["infer_ms_per_image"]),
    "train_ms_per_image": Axis("training ms / image", "ms", lambda c: 1e3 / c["train_images_per_s"]),
    "train_peak_mb": Axis("training peak memory", "mb", lambda c: c["train_peak_mb"]),
    "infer_peak_mb": Axis("inference peak memory", "mb", lambda c: c["infer_peak_mb"]),
    # 3 x forward FLOPs x training images; with --include-init-cost plus the init_from run's (upcycling)
    "train_gflops_total": Axis("training FLOPs (total)", "flops", lambda c: c["train_gflops_total"]),
}
REQUIRED_AXES = ("gflops_per_image", "params_total", "infer_ms_per_image", "train_ms_per_image")
# Timings that `moebench measure` re-takes quietly; they replace the ones taken during training.
MEASURED_KEYS = ("infer_ms_per_image", "infer_images_per_s", "latency_ms", "train_images_per_s")

CONFIG_KEYS = {  # column -> dotted path in the resolved config
    "router": "router.name", "experts": "router.num_experts", "slots": "router.slots_per_expert",
    "k": "router.k", "capacity_factor": "router.capacity_factor", "bpr": "router.bpr",
    "dispatch": "router.dispatch", "combine": "router.combine", "model": "model.name", "data": "data.name",
    "seed": "seed",
}
# Config keys left out when grouping runs into arms and setups: the seed, run policies and bookkeeping
# (schema.ROLES, the table resume's checks use too). What makes a setup: schema.SETUP_KEYS.
NEUTRAL_KEYS = schema.keys_with(schema.PER_RUN, schema.BOOKKEEPING)
SETUP_KEYS, ARM_ONLY_KEYS = schema.SETUP_KEYS, schema.ARM_ONLY_KEYS


class ParetoError(Exception):
    """Nothing to aggregate at the given paths, or runs that must not share a frontier."""


def pareto_mask(costs: list[float], qualities: list[float]) -> list[bool]:
    """True for the points no other point dominates (cheaper-or-equal and better-or-equal, one strictly)."""
    points = list(zip(costs, qualities))
    return [
        not any(c2 <= c and q2 >= q and (c2 < c or q2 > q) for c2, q2 in points)
        for c, q in points
    ]


# ----------------------------------------------------------------------------- numbers for humans

def si(value: float, digits: int = 3) -> str:
    """1234567 -> '1.23M', 30e6 -> '30M', 8779 -> '8.78k', 0.5 -> '0.5'."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def human_flops(gflops: float) -> str:
    return _with_unit(si(gflops * 1e9), "FLOPs")


def _with_unit(number: str, unit: str) -> str:
    """'30M', 'FLOPs' -> '30 MFLOPs': the SI prefix joins the unit."""
    prefix = number[-1] if number[-1] in "kMGT" else ""
    return f"{number[:-1] if prefix else number} {prefix}{unit}"


def human_mb(mb: float) -> str:
    return f"{mb / 1024:.3g} GB" if mb >= 1024 else f"{mb:.3g} MB"


def human_percent(fraction: float, half_width: float | None = None) -> str:
    text = f"{100 * fraction:.2f}"
    return f"{text} ± {100 * half_width:.2f}%" if half_width is not None else f"{text}%"


def human(value: float, unit: str) -> str:
    if unit == "flops":
        return human_flops(value)
    if unit == "count":
        return si(value)
    if unit == "mb":
        return human_mb(value)
    return f"{value:.3g} ms"


# ----------------------------------------------------------------------------- run records

@dataclass
class Run:
    path: Path
    status: str
    config: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)  # with the quiet re-timings (cost_measured) in place
    quality: dict = field(default_factory=dict)
    error: str | None = None
    timing: str = "training"  # where timings come from: training, measured (moebench measure --train),
    # or measured inference (moebench measure without --train: the training step time is from training)
    init_from: dict | None = None  # the run it started from and that run's training cost (upcycling)
    searched: tuple = ()  # keys a search (hydra/sweeper=optuna) set for this run: not part of its setup

    def get(self, dotted: str):
        node = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    @property
    def label(self) -> str:
        """The router's name and its own label words (moe/registry.py: Router.label); arms that still
        share a label get the differing keys appended (arm_labels)."""
        name = self.get("router.name") or "?"
        router = registry.find(name)
        parts = router.label(lambda key: self.get(f"router.{key}")) if router else []
        if self.get("init_from"):  # started from a dense run's checkpoint
            parts.append("upcycled" if router is None or router.routed else "continued")
        return " ".join([name, *parts])


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return schema.under(key, prefixes)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under ``paths`` (run dirs or sweep dirs), finished or not, sorted by path."""
    runs: dict[Path, Run] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ParetoError(f"{path}: no such run or sweep directory")
        for hydra_dir in sorted(path.rglob(".hydra")):  # every Hydra job leaves one
            run_dir = hydra_dir.parent
            runs[run_dir.resolve()] = read_run(run_dir)
        for result in sorted(path.rglob("result.json")):  # e.g. resumed runs
            runs.setdefault(result.parent.resolve(), read_run(result.parent))
    if not runs:
        raise ParetoError(f"no runs (result.json or .hydra/) under {', '.join(map(str, paths))}")
    return [runs[key] for key in sorted(runs)]


def read_run(run_dir: Path) -> Run:
    run_dir = run_dir.resolve()
    path = run_dir / "result.json"
    if checkpoint.lock_state(run_dir)[0]:  # a process trains it now (its result.json, if any, is an older one)
        return Run(run_dir, "running")
    if not path.exists():
        return Run(run_dir, "unfinished")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return Run(run_dir, "unreadable", error=str(err))
    cost, timing = dict(data.get("cost") or {}), "training"
    measured = data.get("cost_measured") or {}
    if measured:
        cost.update({key: measured[key] for key in MEASURED_KEYS if key in measured})
        for key in ("train_peak_mb", "infer_peak_mb"):  # deterministic: from training when it has them
            if key in measured:
                cost.setdefault(key, measured[key])
        timing = "measured" if "train_images_per_s" in measured else "measured inference"
    quality = dict(data.get("quality") or {})
    for name, shots in (data.get("probe") or {}).items():  # moebench probe: --quality probe.<data>.<k>shot
        for key, entry in (shots if isinstance(shots, dict) else {}).items():
            if isinstance(entry, dict) and "top1_mean" in entry:
                quality[f"probe.{name}.{key}"] = entry["top1_mean"]
    config, init_from = data.get("config") or {}, data.get("init_from")
    init_from = init_from if isinstance(init_from, dict) else None
    if config.get("init_from"):  # runs upcycled from different seeds of one dense arm are seeds of one arm
        config = {**config, "init_from": f"{(init_from or {}).get('router')} step {(init_from or {}).get('step')}"}
    searched = tuple((data.get("search") or {}).get("searched") or ())
    return Run(run_dir, data.get("status", "unknown"), config, cost, quality, data.get("error"), timing, init_from,
               searched=searched)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def why_unusable(run: Run, quality: str = QUALITY, required: tuple[str, ...] = REQUIRED_AXES) -> str | None:
    """None for a run that can go on a frontier, else the reason it cannot."""
    if run.status != "completed":
        return run.status
    if run.quality.get(quality) is None:
        return f"no quality.{quality}"
    if not _finite(run.quality.get(quality)) or ("loss" in run.quality and not _finite(run.quality["loss"])):
        return "diverged"  # a NaN loss is no quality, however cheap the run
    missing = [axis for axis in required if not _axis_value(run, axis)]
    return f"no cost record ({', '.join(missing)})" if missing else None


def _axis_value(run: Run, axis: str) -> float | None:
    try:
        value = COST_AXES[axis].value(run.cost)
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return value if _finite(value) else None


def usable(run: Run, quality: str = QUALITY, required: tuple[str, ...] = REQUIRED_AXES) -> bool:
    return why_unusable(run, quality, required) is None


def add_init_cost(runs: list[Run]) -> int:
    """--include-init-cost: add to each upcycled run's training FLOPs those of the run it started from
    (and of that run's own init_from chain); returns how many runs it changed. A run whose init
    cost is unknown loses the axis (it is then listed, not put on a frontier)."""
    changed = 0
    for run in runs:
        if run.init_from is None or "train_gflops_total" not in run.cost:
            continue
        init = run.init_from.get("total_train_gflops")
        if _finite(init):
            run.cost["train_gflops_total"] += init
            changed += 1
        else:
            del run.cost["train_gflops_total"]
            run.error = f"the training FLOPs of its init_from run {run.init_from.get('run_dir')} are unknown"
    return changed


# ----------------------------------------------------------------------------- setups and arms

def setup_of(run: Run) -> dict:
    return {key: value for key, value in flatten(run.config).items()
            if _under(key, SETUP_KEYS) and not _under(key, NEUTRAL_KEYS + ARM_ONLY_KEYS + run.searched)}


def arm_of(run: Run) -> tuple:
    """What makes two runs seeds of one arm: every config key that is not neutral. A null key
    counts as absent (as in ``differing_keys``): a key added later with a null default (off)
    leaves the runs made before it in the same arm."""
    return tuple(sorted((key, json.dumps(value, sort_keys=True)) for key, value in flatten(run.config).items()
                        if not _under(key, NEUTRAL_KEYS) and value is not None))


def differing_keys(configs: list[dict]) -> list[str]:
    """Keys whose value is not the same in all ``configs``, in the first config's order."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if len({json.dumps(c.get(key), sort_keys=True) for c in configs}) > 1]


def split_setups(runs: list[Run], names: dict[Path, str], allow_mixed: bool) -> dict[str, list[Run]]:
    """Runs by setup name ("" when all share one). Mixed setups need ``allow_mixed``."""
    setups = [setup_of(run) for run in runs]
    keys = differing_keys(setups)
    if not keys:
        return {"": runs} if runs else {}
    if not allow_mixed:
        key = keys[0]
        other = next(i for i, setup in enumerate(setups) if setup.get(key) != setups[0].get(key))
        raise ParetoError(
            f"runs differ in {key} ({setups[0].get(key)!r} in {names[runs[0].path]}, {setups[other].get(key)!r} in "
            f"{names[runs[other].path]}): one frontier compares one setup; pass --allow-mixed for one frontier per setup")
    groups: dict[str, list[Run]] = {}
    for run, setup in zip(runs, setups):
        groups.setdefault(", ".join(f"{key}={setup.get(key)}" for key in keys), []).append(run)
    return groups


def arm_labels(runs: list[Run]) -> dict[tuple, str]:
    """A readable label per arm: the router label, plus the keys that tell apart arms sharing it."""
    arms: dict[tuple, Run] = {}
    for run in runs:
        arms.setdefault(arm_of(run), run)
    by_label: dict[str, list[tuple]] = {}
    for key, run in arms.items():
        by_label.setdefault(run.label, []).append(key)
    labels = {}
    for label, keys in by_label.items():
        extra = differing_keys([dict(key) for key in keys]) if len(keys) > 1 else []
        for key in keys:
            values = dict(key)
            labels[key] = " ".join([label, *(f"{k}={json.loads(values[k]) if k in values else None}" for k in extra)])
    return labels


def frontier_flags(rows: list[dict], axes: list[str], quality: str, prefix: str = "frontier_") -> None:
    """Mark each row on/off the frontier of each axis, within its setup."""
    for setup in dict.fromkeys(row["setup"] for row in rows):
        idx = [i for i, row in enumerate(rows) if row["setup"] == setup]
        for axis in axes:
            mask = pareto_mask([rows[i][axis] for i in idx], [rows[i][quality] for i in idx])
            for i, on in zip(idx, mask):
                rows[i][f"{prefix}{axis}"] = on


# ----------------------------------------------------------------------------- the tables

def run_rows(names: dict[Path, str], setups: dict[str, list[Run]], axes: list[str], quality: str) -> list[dict]:
    """One row per usable run: config keys, cost axes, qualities, and on/off each frontier."""
    rows = []
    for setup, members in setups.items():
        labels = arm_labels(members)
        for run in members:
            row = {"run": names[run.path], "label": labels[arm_of(run)],
                   **{col: run.get(key) for col, key in CONFIG_KEYS.items()}, "setup": setup}
            row.update({axis: _axis_value(run, axis) for axis in axes})
            row.update({"params_active": run.cost.get("params_active"), "latency_ms": run.cost.get("latency_ms"),
                        "timing": run.timing})
            for key in ("top1", "top1_at_best_val", "val_top1_best", "top5"):
                row[key] = run.quality.get(key)
            if quality not in row:  # a probe quality (probe.<data>.<k>shot)
                row[quality] = run.quality.get(quality)
            rows.append(row)
    frontier_flags(rows, axes, quality)
    for router in dict.fromkeys(row["router"] for row in rows):  # each router's own frontier
        own = [row for row in rows if row["router"] == router]
        frontier_flags(own, axes, quality, prefix="router_frontier_")
    return rows


def per_seed(members: list[dict], key: str) -> list[float]:
    """One value per seed: runs of one arm that repeat a seed (e.g. a search proposing the same
    configuration twice) are one sample, not two; their mean stands for that seed."""
    by_seed: dict = {}
    for i, row in enumerate(members):
        by_seed.setdefault(("seed", row["seed"]) if row["seed"] is not None else ("run", i), []).append(row[key])
    return [statistics.fmean(values) for values in by_seed.values()]


def arm_rows(rows: list[dict], axes: list[str], quality: str) -> list[dict]:
    """One row per arm (runs sharing everything but the seed): means, spread, frontier on the means.
    The spread and interval are over distinct seeds (``per_seed``)."""
    arms: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        arms.setdefault((row["setup"], row["label"]), []).append(row)
    out = []
    for (setup, label), members in arms.items():
        values = per_seed(members, quality)
        arm = {"label": label, "setup": setup, "router": members[0]["router"], "seeds": len(values),
               "seed_values": sorted({row["seed"] for row in members if row["seed"] is not None}),
               f"{quality}_mean": statistics.fmean(values),
               f"{quality}_std": statistics.stdev(values) if len(values) > 1 else None,
               f"{quality}_ci95": ci95_half_width(values)}
        arm.update({f"{axis}_mean": statistics.fmean(row[axis] for row in members) for axis in axes})
        arm["runs"] = [row["run"] for row in members]
        out.append(arm)
    mean_rows = [{"setup": arm["setup"], quality: arm[f"{quality}_mean"],
                  **{axis: arm[f"{axis}_mean"] for axis in axes}} for arm in out]
    frontier_flags(mean_rows, axes, quality)
    for arm, flags in zip(out, mean_rows):
        arm.update({key: value for key, value in flags.items() if key.startswith("frontier_")})
    return out


def compare_arms(rows: list[dict], arms: list[dict], quality: str) -> list[dict]:
    """Every pair of arms of one setup, the better first: the difference of their means and its
    95% Welch interval; ``separated`` when the interval excludes 0 (a gap larger than seed noise)."""
    members: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        members.setdefault((row["setup"], row["label"]), []).append(row)
    values = {key: per_seed(runs, quality) for key, runs in members.items()}
    out = []
    for setup in dict.fromkeys(arm["setup"] for arm in arms):
        ranked = sorted((arm for arm in arms if arm["setup"] == setup), key=lambda a: -a[f"{quality}_mean"])
        for i, better in enumerate(ranked):
            for worse in ranked[i + 1:]:
                diff = better[f"{quality}_mean"] - worse[f"{quality}_mean"]
                half = welch_ci95(values[(setup, better["label"])], values[(setup, worse["label"])])
                out.append({"setup": setup, "better": better["label"], "worse": worse["label"],
                            f"{quality}_difference": diff, f"{quality}_difference_ci95": half,
                            "separated": None if half is None else diff > half})
    return out


@contextlib.contextmanager
def sweep_lock(out_dir: Path):
    """Hold ``out_dir``'s pareto lock: two sweeps ending in one sweep dir write their files one after the other."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / PARETO_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks: the other sweep's aggregation takes seconds
        yield
    finally:
        os.close(fd)


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ";".join(map(str, value)) if isinstance(value, list) else value
                             for key, value in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())


# ----------------------------------------------------------------------------- the plot

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


# ----------------------------------------------------------------------------- the terminal

def print_tables(arms: list[dict], axes: list[str], quality: str, skipped: list[tuple[Run, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes: no 80-column wrap
    for setup in dict.fromkeys(arm["setup"] for arm in arms):
        title = "arms (mean over seeds ± 95% t-interval; * = on the frontier of arm means for that cost)"
        table = Table(title=f"{setup}: {title}" if setup else title, title_justify="left")
        table.add_column("arm", overflow="fold")
        table.add_column("seeds", justify="right")
        table.add_column("top-1" if quality == "top1" else quality, justify="right", no_wrap=True)
        for axis in axes:
            table.add_column(COST_AXES[axis].label, justify="right")
        own = sorted((arm for arm in arms if arm["setup"] == setup), key=lambda a: (-a[f"{quality}_mean"], a["label"]))
        for arm in own:
            cells = [human(arm[f"{axis}_mean"], COST_AXES[axis].unit) + (" *" if arm[f"frontier_{axis}"] else "  ")
                     for axis in axes]
            table.add_row(arm["label"], str(arm["seeds"]),
                          human_percent(arm[f"{quality}_mean"], arm[f"{quality}_ci95"]), *cells)
        console.print(table)
    for run, reason in skipped:  # whole paths: one per line, never wrapped or cut
        console.print(f"not on a frontier: {run.path} ({reason}{': ' + run.error if run.error else ''})",
                      soft_wrap=True, markup=False, highlight=False)


def print_gaps(comparisons: list[dict], quality: str) -> None:
    """Each arm against the next one down the ranking: is the gap larger than seed noise?"""
    shown = set()
    for c in comparisons:
        if c[f"{quality}_difference_ci95"] is None or (c["setup"], c["better"]) in shown:
            continue
        shown.add((c["setup"], c["better"]))  # the first pair of each arm is its next one down
        verdict = "larger than seed noise" if c["separated"] else "within seed noise"
        print(f"{c['setup'] + ': ' if c['setup'] else ''}{c['better']} - {c['worse']}: "
              f"{100 * c[f'{quality}_difference']:+.2f} ± {100 * c[f'{quality}_difference_ci95']:.2f} points "
              f"(95% Welch): {verdict}")


def log_wandb(rows: list[dict], arms: list[dict], png: Path, wandb_cfg: dict, run_dir: Path) -> str | None:
    """One W&B run (job_type pareto) with tables of runs and arms, a scatter per cost axis and the PNG."""
    if not wandb_cfg or wandb_cfg.get("mode", "disabled") == "disabled":
        return None
    import wandb

    run = wandb.init(
        project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), group=wandb_cfg.get("group"),
        name=f"pareto-{wandb_cfg.get('group') or run_dir.name}", job_type="pareto", dir=str(run_dir),
        mode=wandb_cfg["mode"], reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
    )

    def table(records: list[dict]):
        columns = list(records[0]) if records else []
        return wandb.Table(columns=columns, data=[[str(r[c]) if isinstance(r[c], list) else r[c] for c in columns]
                                                  for r in records])

    runs_table = table(rows)
    axes = [axis for axis in COST_AXES if rows and axis in rows[0]]
    charts = {f"pareto/top1_vs_{axis}": wandb.plot.scatter(runs_table, axis, "top1", title=f"top-1 vs {COST_AXES[axis].label}")
              for axis in axes}
    run.log({"pareto/runs": runs_table, "pareto/arms": table(arms), **charts, "pareto/plot": wandb.Image(str(png))})
    run_id = run.id
    run.finish()
    return run_id


# ----------------------------------------------------------------------------- putting it together

def aggregate(paths: list[str | Path], out_dir: Path, *, wandb_cfg: dict | None = None, show: bool = True,
              allow_mixed: bool = False, quality: str = QUALITY, include_init_cost: bool = False) -> dict:
    """Find the runs, group them into setups and arms, compute the frontiers, write
    pareto.csv (runs), pareto_arms.csv, pareto.json and pareto.png to ``out_dir``.
    ``include_init_cost``: training FLOPs (a required axis then) count the init_from runs' training.
    Runs are read and files written under ``out_dir``'s lock (sweep_lock); every file is replaced atomically."""
    if not all(Path(p).exists() for p in paths):
        find_runs(paths)  # its error: no such dir (before any out dir is made)
    with sweep_lock(Path(out_dir)):
        return _aggregate(paths, out_dir, wandb_cfg=wandb_cfg, show=show, allow_mixed=allow_mixed, quality=quality,
                          include_init_cost=include_init_cost)


def _aggregate(paths: list[str | Path], out_dir: Path, *, wandb_cfg: dict | None, show: bool, allow_mixed: bool,
               quality: str, include_init_cost: bool) -> dict:
    runs = find_runs(paths)
    required = REQUIRED_AXES + (("train_gflops_total",) if include_init_cost else ())
    with_init = add_init_cost(runs) if include_init_cost else 0
    out_dir = Path(out_dir)
    root = Path(os.path.commonpath([Path(p).resolve() for p in paths]))  # run names relative to it
    names = {run.path: str(run.path.relative_to(root)) if run.path.is_relative_to(root) and run.path != root
             else str(run.path) for run in runs}
    skipped = [(run, why_unusable(run, quality, required)) for run in runs if not usable(run, quality, required)]
    done = [run for run in runs if usable(run, quality, required)]
    setups = split_setups(done, names, allow_mixed)  # refuses mixed setups before anything is written
    axes = [axis for axis in COST_AXES if axis in REQUIRED_AXES or all(_axis_value(r, axis) for r in done)]
    rows = run_rows(names, setups, axes, quality)
    arms = arm_rows(rows, axes, quality)
    comparisons = compare_arms(rows, arms, quality)
    measured = sum(run.timing != "training" for run in done)
    train_measured = sum(run.timing == "measured" for run in done)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: (out_dir / name).resolve() for name in ("pareto.csv", "pareto_arms.csv", "pareto.json", "pareto.png")}
    summary = {
        "quality": quality,
        "cost_axes": axes,
        "timing": {"measured": measured, "training": len(done) - measured, "train_step_measured": train_measured},
        "init_cost_included": include_init_cost,
        "setups": [{"name": name, "runs": len(members)} for name, members in setups.items()],
        "arms": arms,
        "comparisons": comparisons,
        "runs": rows,
        "skipped": [{"run": str(run.path), "status": reason, "error": run.error} for run, reason in skipped],
    }
    atomic_write_json(files["pareto.json"], summary)
    write_csv(rows, files["pareto.csv"])
    write_csv(arms, files["pareto_arms.csv"])
    if rows:
        plot(rows, arms, axes, quality, files["pareto.png"], title=out_dir.resolve().name)
    if show:
        if len(setups) > 1:
            print(f"{len(setups)} setups (runs differ in {', '.join(differing_keys([setup_of(r) for r in done]))}): "
                  "one frontier per setup")
        if measured:
            print(f"timings from `moebench measure` (cost_measured) for {measured} of {len(done)} runs"
                  + ("" if measured == len(done) else "; the others from training (not comparable: re-measure them)")
                  + ("" if train_measured == measured else
                     f"; training step time measured for {train_measured} of them (the rest: measure --train)"))
        upcycled = sum(run.init_from is not None for run in done)
        if include_init_cost:
            print(f"training FLOPs (total) include the init_from run's training for {with_init} of {len(done)} runs "
                  "(--include-init-cost)")
        elif upcycled:
            print(f"{upcycled} of {len(done)} runs started from another run's checkpoint (init_from); their training "
                  "FLOPs leave that run's out: --include-init-cost counts it")
        print_tables(arms, axes, quality, skipped)
        print_gaps(comparisons, quality)
    if rows:
        summary["wandb_run_id"] = log_wandb(rows, arms, files["pareto.png"], wandb_cfg or {}, out_dir)
    summary["files"] = {name: str(path) for name, path in files.items() if path.exists()}
    return summary


def print_files(summary: dict) -> None:
    """The result files, as whole paths."""
    runs, arms, skipped = len(summary["runs"]), len(summary["arms"]), len(summary["skipped"])
    print(f"{runs} runs in {arms} arms, {skipped} not on a frontier ->")
    for path in summary["files"].values():
        print(f"  {path}")


class ParetoCallback(Callback):
    """Hydra callback: aggregate a ``-m`` sweep into its sweep dir when it ends (and keep each launch's
    own multirun record when it starts: several launches may share one sweep dir)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        launch = status.this_launch()
        if launch is None or not distributed.current().is_main:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)  # Hydra's multirun.yaml is the latest launch's only
        atomic_write_bytes(sweep_dir / f"multirun.{launch}.yaml", OmegaConf.to_yaml(config).encode())

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists() or not distributed.current().is_main:  # under torchrun, rank 0 aggregates
            return
        wandb_cfg = {"mode": config.wandb.mode, "project": config.wandb.project, "entity": config.wandb.entity,
                     "group": config.wandb.group or sweep_group(sweep_dir)}  # the training runs' group
        from .status import FAILED_JOBS, NOT_OK  # the exit code of `moebench train -m`

        try:  # a sweep over lr or data is a legitimate sweep: one frontier per setup
            summary = aggregate([sweep_dir], sweep_dir, wandb_cfg=wandb_cfg, allow_mixed=True)
        except ParetoError as err:  # every job failed before writing anything: say so, don't crash
            print(f"moebench: pareto: {err}")
            FAILED_JOBS.append(str(sweep_dir))
            return
        print_files(summary)
        # Launchers that run jobs in other processes (joblib, submitit) report failures only on disk. Only
        # this launch's jobs count: another sweep into the same dir has its own (runs in flight: "running").
        launch = status.this_launch()
        FAILED_JOBS.extend(s["run"] for s in summary["skipped"]
                           if s["status"] in NOT_OK and checkpoint.lock_state(Path(s["run"]))[1] == launch)


READING = """\
Runs that differ only in seed form an arm: its mean top-1, the standard deviation
over seeds and the half-width of a 95% t-interval of the mean (pareto_arms.csv,
"arms" in pareto.json, error bars in pareto.png). The frontier is drawn over arm
means. Reading two arms: intervals that do not overlap mean a difference larger
than seed noise; overlapping intervals do not settle the ordering either way
(more seeds narrow them). One seed gives no interval.
Timings come from `moebench measure` (cost_measured) where a run has them."""


def quality_key(value: str) -> str:
    if value in QUALITIES or (value.startswith("probe.") and len(value.split(".")) == 3):
        return value
    import argparse

    raise argparse.ArgumentTypeError(f"{value!r}: choose {', '.join(QUALITIES)} or probe.<data>.<k>shot")


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="moebench pareto", description="Cost/quality Pareto frontier of runs.",
                                     epilog=READING, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep dirs and/or run dirs (several are combined)")
    parser.add_argument("--out", type=Path, help="where to write pareto.*; default: the path if only one")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="runs of different setups (data, model, schedule): one frontier per setup")
    parser.add_argument("--quality", default=QUALITY, type=quality_key,
                        help="quality axis: final model's test top-1 (top1), test top-1 at the best validation "
                             "epoch (top1_at_best_val), the best validation top-1 (val_top1_best: what a "
                             "hydra/sweeper=optuna search maximizes), or a few-shot probe's mean "
                             "(probe.<data>.<k>shot, from moebench probe)")
    parser.add_argument("--include-init-cost", action="store_true",
                        help="add the training FLOPs of the run an upcycled run started from (init_from) to its "
                             "training FLOPs axis")
    parser.add_argument("--wandb-mode", default=None, choices=["offline", "online", "disabled"],
                        help="default: as the runs were logged (disabled when none of them used W&B)")
    parser.add_argument("--wandb-project", default=None, help="default: the runs' project")
    parser.add_argument("--wandb-group", default=None, help="default: the sweep's group")
    parser.add_argument("--wandb-report", action="store_true",
                        help="also save a W&B report of the runs (W&B online; pip install 'moebench[report]')")
    args = parser.parse_args(argv)
    out = args.out or (Path(args.paths[0]) if len(args.paths) == 1 else Path("pareto"))
    wandb_cfg = report.pareto_wandb_cfg(args.paths, out, mode=args.wandb_mode, project=args.wandb_project,
                                        group=args.wandb_group)
    try:
        summary = aggregate(args.paths, out, wandb_cfg=wandb_cfg, allow_mixed=args.allow_mixed, quality=args.quality,
                            include_init_cost=args.include_init_cost)
    except ParetoError as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
    print_files(summary)
    return report.main(args.paths, out, wandb_cfg, summary.get("wandb_run_id")) if args.wandb_report else 0
