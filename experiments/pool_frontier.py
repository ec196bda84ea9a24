"""One frontier from the runs of several pareto.json files: arms run in different recipes, same setup.

    python experiments/pool_frontier.py --out results/router_study_cifar10 --title "CIFAR-10, recipe 14" \
        results/cifar10_routers/pareto.json "results/cifar10_scale_grid/pareto.json:soft E64 p1 scale8" \
        multirun/router_study/cifar10/pareto.json

A sweep's run dirs are not committed, its pareto.json is, with every run's arm label, seed,
config, quality and exact costs. This pools the runs of several files (``FILE:LABEL[,LABEL]``
takes only those arms of FILE), refuses runs whose model or data names or setup labels differ and
two different results for one arm and seed, and writes pareto.json,
pareto.csv, pareto_arms.csv and pareto.png to --out with moebench's own frontier, arm and
comparison code. Cost axes: the exact ones only (FLOPs, parameters, the model's peak memory);
wall-clock timings from different sessions of a shared machine order nothing. A pareto.json does
not keep whole configs: pool only files whose recipes state one setup (and re-run a seed of an
old arm at the current commit to show its runs still stand, as recipe 14 does).

A pooled file may be pooled again (its runs keep their names), which is how a study carries the
committed records of runs trained on another machine, whose dirs are gone, beside its new runs:
give the earlier --out file first; a later file's record of the same arm and seed replaces it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moebench.pareto import write_csv
from moebench.pareto.arms import arm_rows, compare_arms, frontier_flags
from moebench.pareto.plot import plot
from moebench.tracking import atomic_write_json

EXACT_AXES = ("gflops_per_image", "params_total", "train_peak_mb", "infer_peak_mb")


def pooled_rows(specs: list[str], quality: str, aliases: dict[str, str] | None = None) -> list[dict]:
    """The runs of ``specs`` as one list; ``aliases`` renames data names that read the same data
    the same way (e.g. ``cifar10`` given an ImageFolder tree is read by the ``imagefolder`` loader)."""
    aliases = aliases or {}
    rows: dict[tuple[str, int], dict] = {}
    for spec in specs:
        path, _, labels = spec.partition(":")
        wanted = {label.strip() for label in labels.split(",")} if labels else None
        records = json.loads(Path(path).read_text())
        file_rows = records["runs"]
        # a pooled file's runs already say which file they came from: pooling it again keeps its names
        prefix = "" if "pooled_from" in records else f"{Path(path).parent.name}/"
        found = {row["label"] for row in file_rows}
        if wanted and not wanted <= found:
            sys.exit(f"pool_frontier: {path} has no arm {sorted(wanted - found)}; its arms: {sorted(found)}")
        for row in file_rows:
            if wanted and row["label"] not in wanted:
                continue
            key = (row["label"], row["seed"])
            seen = rows.get(key)
            if seen is not None and seen[quality] != row[quality]:
                sys.exit(f"pool_frontier: {key[0]} seed {key[1]} is {seen[quality]} in one file and {row[quality]} "
                         f"in {path}: not the same run")
            rows[key] = {**row, "run": prefix + row["run"],
                         "data": aliases.get(row.get("data"), row.get("data"))}
    pooled = list(rows.values())
    for key in ("model", "data", "setup"):
        values = {json.dumps(row.get(key), sort_keys=True) for row in pooled}
        if len(values) > 1:
            sys.exit(f"pool_frontier: the runs differ in {key} ({', '.join(sorted(values))}): not one setup")
    return pooled


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="pareto.json files, FILE:LABEL[,LABEL] for some of its arms")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", required=True, help="the plot's title: data and setup")
    parser.add_argument("--quality", default="top1")
    parser.add_argument("--same-data", action="append", default=[], metavar="A=B",
                        help="data name A is read exactly as B (say why in the recipe); may repeat")
    args = parser.parse_args(argv)
    aliases = dict(pair.split("=", 1) for pair in args.same_data)
    rows = pooled_rows(args.files, args.quality, aliases)
    axes = [axis for axis in EXACT_AXES if all(row.get(axis) is not None for row in rows)]
    frontier_flags(rows, axes, args.quality)
    for router in dict.fromkeys(row["router"] for row in rows):
        frontier_flags([row for row in rows if row["router"] == router], axes, args.quality, prefix="router_frontier_")
    arms = arm_rows(rows, axes, args.quality)
    summary = {"quality": args.quality, "cost_axes": axes, "pooled_from": args.files, "same_data": aliases,
               "setups": [{"name": rows[0]["setup"], "runs": len(rows)}], "arms": arms,
               "comparisons": compare_arms(rows, arms, args.quality), "runs": rows, "skipped": []}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "pareto.json", summary)
    write_csv(rows, args.out / "pareto.csv")
    write_csv(arms, args.out / "pareto_arms.csv")
    plot(rows, arms, axes, args.quality, args.out / "pareto.png", title=args.title)
    for arm in sorted(arms, key=lambda a: -a[f"{args.quality}_mean"]):
        print(f"{arm['label']:40s} {arm['seeds']} seeds  {100 * arm[f'{args.quality}_mean']:.2f} "
              f"+- {100 * (arm[f'{args.quality}_ci95'] or float('nan')):.2f}  {arm['gflops_per_image_mean']:.4f} GFLOPs")
    print(f"wrote {args.out}/pareto.json, pareto.csv, pareto_arms.csv, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
