"""Runs into setups and arms: labels, per-run rows, per-arm means and intervals, arm comparisons.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


from ..schema import flatten
from ..stats import ci95_half_width, welch_ci95
from .records import (
    ARM_ONLY_KEYS, CONFIG_KEYS, NEUTRAL_KEYS, SETUP_KEYS, ParetoError, Run, _axis_value, _under, pareto_mask,
)


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
