"""A search's Pareto set beside a grid's arms, on one cost axis (recipe 9).

    python experiments/search_vs_grid.py results/cifar10_search/pareto.json results/cifar10_routers/pareto.json \
        [--cost gflops_per_image] [--markdown OUT]

Both files are `moebench pareto` outputs (the search's drawn with --quality
val_top1_best, what the study maximized). Every trial of the search is one run;
the grid's arms are means over seeds. Prints the search's frontier (validation
and test top-1: test is the unbiased figure, validation is what was searched),
each grid arm with its validation and test means, and whether a search trial
dominates it (no more cost, higher quality) on validation and on test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def grid_arms(grid: dict, cost: str) -> list[dict]:
    arms: dict[str, list[dict]] = {}
    for run in grid["runs"]:
        arms.setdefault(run["label"], []).append(run)
    return [{"label": label, "seeds": len(runs), cost: statistics.fmean(r[cost] for r in runs),
             "val": statistics.fmean(r["val_top1_best"] for r in runs),
             "test": statistics.fmean(r["top1"] for r in runs)} for label, runs in arms.items()]


def dominated_by(arm: dict, trials: list[dict], cost: str, quality: str) -> list[dict]:
    return [t for t in trials if t[cost] <= arm[cost] and t[quality] > arm[quality]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("search", type=Path, help="pareto.json of the search (--quality val_top1_best)")
    parser.add_argument("grid", type=Path, help="pareto.json of the grid")
    parser.add_argument("--cost", default="gflops_per_image")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    search, grid = json.loads(args.search.read_text()), json.loads(args.grid.read_text())
    cost = args.cost
    trials = [{"run": r["run"], "label": r["label"], cost: r[cost], "val": r["val_top1_best"], "test": r["top1"],
               "front": r.get(f"frontier_{cost}")} for r in search["runs"]]
    if not trials:
        print(f"search_vs_grid: no completed runs in {args.search}", file=sys.stderr)
        return 1
    lines = [f"Search: {len(trials)} completed trials, {len(search.get('skipped', []))} skipped; "
             f"its Pareto set on {cost} x validation top-1:", "",
             f"| trial | arm | {cost} | val top-1 % | test top-1 % |", "|---|---|---:|---:|---:|"]
    for t in sorted((t for t in trials if t["front"]), key=lambda t: t[cost]):
        lines.append(f"| {t['run'].split('_', 1)[0]} | {t['label']} | {t[cost]:.4f} | {100 * t['val']:.2f} | "
                     f"{100 * t['test']:.2f} |")
    lines += ["", f"Grid arms (means over seeds) and the search trials that dominate them:", "",
              f"| arm | seeds | {cost} | val top-1 % | test top-1 % | dominated on val by | dominated on test by |",
              "|---|---:|---:|---:|---:|---|---|"]
    for arm in sorted(grid_arms(grid, cost), key=lambda a: a[cost]):
        by = {q: ", ".join(t["run"].split("_", 1)[0] for t in dominated_by(arm, trials, cost, q)) or "none"
              for q in ("val", "test")}
        lines.append(f"| {arm['label']} | {arm['seeds']} | {arm[cost]:.4f} | {100 * arm['val']:.2f} | "
                     f"{100 * arm['test']:.2f} | {by['val']} | {by['test']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
