"""Tables of the docs drawn from committed records that are not compare_arms' arms-by-seed shape.

report_tables.py calls these when a table line starts with their kind:

    <!-- table: search-pareto ../results/cifar10_search/pareto.json ../results/cifar10_search/optimization_results.yaml -->
    <!-- table: soft-init-diagnostics ../results/cifar10_scale_grid/routing_diagnostics.json -->
    <!-- table: router-diagnostics ../results/modern_routers_cifar10/routing_diagnostics.json -->

search-pareto: the study's Pareto set (best validation top-1 up, GFLOPs per image down) from
its pareto.json, one row per distinct result with the trials that gave it; refused unless
it is exactly Optuna's own ``solutions``, so the page's "this is what Optuna found" stays true.

soft-init-diagnostics: recipe 7's routing health per (logit scale at init, expert init) cell,
the range over seeds of each figure routing_diagnostics.py wrote. A run named only by its
variant (recipe 7's scale-8 cell, ``variant=soft_e64_s8_onedraw``) takes its scale and init
from that variant's file in conf/variant.

router-diagnostics: a study's routing health per arm (as moebench pareto labels it): the range over seeds
of load, drops, the selection bias's spread and ReMoE's experts per token at the last logged step, of
drops and load over the whole training (their mean over the logged steps), and of the router's final
AdamW first moment (its mean magnitude: about 0 when the router got no gradient), as routing_diagnostics.py
wrote them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


class RecordError(Exception):
    """Records that do not give the table the page asks for."""


def _trial(run: dict) -> int:
    # Hydra names a sweep's run dir by its job number; for an Optuna sweep that is the trial number.
    return int(run["run"].split("_", 1)[0])


def _arm(run: dict, lr: float) -> str:
    # The label names train.lr only where it differs from the preset's, so the lr comes from Optuna's params.
    return f"{re.sub(r' train[.]lr=[0-9.e-]+', '', run['label'])}, lr {lr:.3g}"


def search_pareto(records: Path, optuna: Path) -> str:
    runs = json.loads(records.read_text())["runs"]
    point = lambda r: (r["val_top1_best"], r["gflops_per_image"])  # noqa: E731 (what the study optimized)
    front = [r for r in runs if not any(point(o)[0] >= point(r)[0] and point(o)[1] <= point(r)[1]
                                        and point(o) != point(r) for o in runs)]
    solutions = yaml.safe_load(optuna.read_text())["solutions"]
    ours = sorted(tuple(point(r)) for r in front)
    theirs = sorted(tuple(s["values"]) for s in solutions)
    if ours != theirs:
        raise RecordError(f"{records}'s Pareto set {ours} is not {optuna}'s solutions {theirs}")
    lr = {tuple(s["values"]): s["params"]["train.lr"] for s in solutions}
    rows: dict[tuple, list[dict]] = {}
    for run in sorted(front, key=_trial):
        rows.setdefault((_arm(run, lr[point(run)]), *point(run), run["top1"]), []).append(run)
    lines = ["| trials | arm | GFLOPs/img | val top-1 % | test top-1 % |", "|---|---|---:|---:|---:|"]
    for (arm, val, gflops, test), same in sorted(rows.items(), key=lambda item: item[0][2]):
        trials = ", ".join(str(_trial(r)) for r in same)
        lines.append(f"| {trials} | {arm} | {gflops:.4f} | {100 * val:.2f} | {100 * test:.2f} |")
    return "\n".join(lines) + "\n"


DIAGNOSTICS = [("routing_last_step", "dispatch_max"), ("routing_last_step", "combine_max"),
               ("routing_last_step", "dispatch_entropy"), ("routing_last_step", "slot_similarity"),
               ("weights", "expert_similarity"), ("weights", "scale")]


def _cell(run: dict) -> tuple[float, bool]:
    keys = dict(part.split("=", 1) for part in run["run"].split("/")[-1].split(","))
    router = {}
    if keys.get("variant"):
        router = (yaml.safe_load((REPO / "conf" / "variant" / f"{keys['variant']}.yaml").read_text())
                  .get("router") or {})
    scale = keys.get("router.scale_init", router.get("scale_init"))
    identical = keys.get("router.identical_init", router.get("identical_init"))
    if scale is None or identical is None:
        raise RecordError(f"{run['run']}: neither its name nor its variant sets scale_init and identical_init")
    return float(scale), str(identical).lower() == "true"


def soft_init_diagnostics(records: Path) -> str:
    cells: dict[tuple[float, bool], list[dict]] = {}
    for run in json.loads(records.read_text()):
        cells.setdefault(_cell(run), []).append(run)
    head = ["scale at init", "experts", "top-1 per seed", *(name for _, name in DIAGNOSTICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (scale, identical), runs in sorted(cells.items()):
        runs.sort(key=lambda r: int(re.search(r"seed=(\d+)", r["run"])[1]))
        cells_text = [f"{scale:g}", "one draw" if identical else "independent",
                      ", ".join(f"{100 * r['top1']:.2f}" for r in runs)]
        for group, name in DIAGNOSTICS:
            values = [r[group][name] for r in runs]
            cells_text.append(f"{min(values):.3g}-{max(values):.3g}")
        lines.append("| " + " | ".join(cells_text) + " |")
    return "\n".join(lines) + "\n"


ROUTER_DIAGNOSTICS = ("dropped", "load_max_over_mean", "load_cv", "bias_spread", "experts_per_token",
                      "tokens_0_experts")
ROUTER_TRAINING_MEANS = ("dropped", "load_max_over_mean")  # the last step hides how long a balancing took to act
ROUTER_WEIGHTS = ("router_adam_m",)  # about 0: the loss gave the router no gradient


def router_diagnostics(records: Path) -> str:
    """Per arm, the range over seeds of each routing figure its runs logged (at their last step, and averaged
    over training) and of their router's final AdamW first moment, each averaged over the MoE blocks
    (routing_diagnostics.py); - where the router has no such figure."""
    arms: dict[str, list[dict]] = {}
    for run in json.loads(records.read_text()):
        if "label" not in run or "routing_training_mean" not in run:
            raise RecordError(f"{records}: written before routing_diagnostics.py recorded each run's arm and "
                              "training means; re-run it")
        arms.setdefault(run["label"], []).append(run)
    columns = ([("routing_last_step", name, name) for name in ROUTER_DIAGNOSTICS]
               + [("routing_training_mean", name, f"{name} (training mean)") for name in ROUTER_TRAINING_MEANS]
               + [("weights", name, name) for name in ROUTER_WEIGHTS])
    head = ["arm", "seeds", "top-1 % per seed", *(title for _, _, title in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in sorted(arms.items(), key=lambda item: -sum(r["top1"] for r in item[1]) / len(item[1])):
        runs.sort(key=lambda r: r["seed"])
        cells = [arm, ", ".join(str(r["seed"]) for r in runs), ", ".join(f"{100 * r['top1']:.2f}" for r in runs)]
        for part, name, _ in columns:
            values = [r[part][name] for r in runs if name in r[part]]
            cells.append("-" if not values else f"{min(values):.3g}" if min(values) == max(values)
                         else f"{min(values):.3g}-{max(values):.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


KINDS = {"search-pareto": search_pareto, "soft-init-diagnostics": soft_init_diagnostics,
         "router-diagnostics": router_diagnostics}
