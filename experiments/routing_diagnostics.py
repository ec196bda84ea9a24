"""Routing diagnostics of trained runs, from their records and final weights.

    python experiments/routing_diagnostics.py RUN_DIR... [--json OUT [--keep OUT]] [--labels PARETO_JSON]

Per run, averaged over its MoE blocks: the routing metrics of its last logged
training step (metrics.jsonl: dispatch/combine max and entropy, drops, ...),
their mean over all its logged steps, the course of a few of them step by step
(``TRAJECTORY``), and the weight diagnostics of its final model (moebench.moe.collect_diagnostics
on last.pt: expert, slot-parameter and gate similarity, Soft MoE's scale), and
``router_adam_m``, the mean |AdamW first moment| of the router's parameters at the
end (from last.pt's optimizer state): about 0 when the loss gives the router no
gradient (e.g. a sigmoid gate over one routed choice). The weight diagnostics are
recomputed from the checkpoint, so runs trained before they were logged get them
too. The recipe pages (experiments/recipes/) quote it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moebench.build import optimizer_groups, router_parameter_names
from moebench.moe import collect_diagnostics
from moebench.moe.base import moe_layers
from moebench.pareto.records import read_run
from moebench.runs import load_run


# The figures whose course over training the records keep (block means at every logged step): balancing's pace.
TRAJECTORY = ("dropped", "load_max_over_mean", "load_cv", "bias_max", "bias_spread", "experts_per_token",
              "tokens_0_experts")


def logged_routing_steps(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, routing metrics) of every logged training step, in step order."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    routed = [(line.get("step"), {key: value for key, value in line.items() if key.startswith("routing/")})
              for line in lines]
    return [(step, metrics) for step, metrics in routed if metrics]


def mean_over_steps(steps: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the logged steps that have it: what the router did during training, where the
    last step says where it ended (a balancing that is slow to act differs most between the two)."""
    names = {name for step in steps for name in step}
    return {name: statistics.fmean(step[name] for step in steps if name in step) for name in sorted(names)}


def per_key_mean(values: dict[str, float]) -> dict[str, float]:
    """{"prefix/blocks.2.mlp/key": v, ...} -> {"key": mean over blocks}."""
    groups: dict[str, list[float]] = {}
    for name, value in values.items():
        groups.setdefault(name.rsplit("/", 1)[-1], []).append(value)
    return {key: statistics.fmean(vs) for key, vs in sorted(groups.items())}


def router_adam_moments(model: torch.nn.Module, config: dict, state: dict) -> dict[str, float]:
    """{"<MoE block>/router_adam_m": mean |AdamW exp_avg| over the block's router parameters}, from the
    optimizer's ``state_dict()["state"]`` (a checkpoint's ``["optimizer"]["state"]``).

    That state numbers the parameters in the order of moebench's parameter groups, so the groups rebuilt
    from the run's config name them."""
    names = [name for group in optimizer_groups(model, OmegaConf.create(config)) for name in group["names"]]
    router = router_parameter_names(model)
    layers = [layer for layer, _ in moe_layers(model)]
    blocks: dict[str, list[torch.Tensor]] = {}
    for index, name in enumerate(names):
        if name in router and index in state:  # no state: a parameter no step has updated yet
            block = next(layer for layer in layers if name.startswith(f"{layer}."))
            blocks.setdefault(block, []).append(state[index]["exp_avg"].abs().flatten())
    return {f"{block}/router_adam_m": torch.cat(moments).mean().item() for block, moments in blocks.items()}


def pooled_labels(pareto: Path, run_dirs: list[Path]) -> dict[Path, str]:
    """Each run's arm as ``pareto`` names it: the label of its one record whose name ends the run's path.
    Arms that share a router label are told apart by keys only in a report of them (moebench pareto)."""
    rows = json.loads(pareto.read_text())["runs"]
    labels = {}
    for run_dir in run_dirs:
        path = str(run_dir.resolve())
        matches = {row["label"] for row in rows if path.endswith("/" + row["run"])}
        if len(matches) == 1:
            labels[run_dir] = matches.pop()
    return labels


def diagnose(run_dir: Path, label: str | None = None) -> dict:
    run = load_run(run_dir)
    record = read_run(run_dir)
    state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)["optimizer"]["state"]
    logged = logged_routing_steps(run_dir)
    step_numbers, steps = [step for step, _ in logged], [metrics for _, metrics in logged]
    return {
        "run": str(run_dir),
        "label": label or record.label,  # the run's arm, as moebench pareto names it
        "seed": record.get("seed"),
        "routing_last_step": per_key_mean(steps[-1] if steps else {}),
        "routing_training_mean": per_key_mean(mean_over_steps(steps)),
        "routing_steps": [{"step": step, **{key: value for key, value in per_key_mean(metrics).items()
                                            if key in TRAJECTORY}} for step, metrics in zip(step_numbers, steps)],
        "weights": per_key_mean({**collect_diagnostics(run.model),
                                 **router_adam_moments(run.model, run.config, state)}),
        "top1": (run.result or {}).get("quality", {}).get("top1"),
    }


def carried_rows(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of ``earlier`` whose run dirs are gone: a sweep's run dirs are not
    committed, its diagnostics are, so a study finished on a new machine keeps what the old one measured."""
    diagnosed = {row["run"] for row in rows}
    gone = [row for row in earlier if row["run"] not in diagnosed and not Path(row["run"]).is_dir()]
    return gone + rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument("--keep", type=Path, metavar="RECORDS",
                        help="an earlier --json file: its rows of runs whose dirs are not on this disk "
                             "(trained on another machine) are kept as recorded")
    parser.add_argument("--labels", type=Path, metavar="PARETO_JSON",
                        help="name each run's arm as this pareto.json does (the record whose name ends the "
                             "run's path), not by its router label alone")
    args = parser.parse_args(argv)
    labels = pooled_labels(args.labels, args.runs) if args.labels else {}
    rows = [diagnose(run_dir, labels.get(run_dir)) for run_dir in args.runs]
    if args.keep and args.keep.exists():
        rows = carried_rows(json.loads(args.keep.read_text()), rows)
    for row in rows:
        cells = {**row["routing_last_step"], **row["weights"]}
        print(f"{row['run']}  top1={row['top1']}")
        print("    " + ", ".join(f"{key}={value:.3g}" for key, value in cells.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
