"""Run records as `moebench pareto` reads them: the cost axes, one run's record, which runs count.

Reads ``result.json`` files only (and ``.hydra/`` for runs that never wrote one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from .. import checkpoint, schema
from ..arguments import QUALITIES, QUALITY  # noqa: F401 (the quality axes: --quality checks them before torch)
from ..moe import registry

PARETO_LOCK = ".moebench.pareto.lock"


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
    "seed": "seed", "dropless": "router.dropless",  # dropless: its label drops C and BPR (the label check rebuilds it)
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
