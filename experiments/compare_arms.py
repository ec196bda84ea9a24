"""Arms and their differences pooled from several committed pareto.json files.

    python experiments/compare_arms.py results/a/pareto.json "results/b/pareto.json@(4 epochs)" \
        --reference dense --reference "soft E64 p1" [--quality top1] [--markdown OUT] \
        [--params] [--train-flops] [--bar]
    python experiments/compare_arms.py results/a/pareto.json "results/a_randaugment/pareto.json@RandAugment" \
        --effect-of RandAugment

A sweep's run dirs are not committed, its pareto.json is: it keeps every run's
arm label, seed, quality and cost. This pools the runs of several files (a run
that two files both hold must agree, which checks that a re-run reproduced it),
then prints per arm the mean with its 95% t-interval and the seeds, and against
each reference arm the difference of means with its Welch 95% interval and,
over the seeds both arms share, the paired mean difference with its interval
(``--bar``: also how far apart, or how much overlapping, the two arms' own
intervals are).
Only pool files of one setup: `moebench pareto` refuses mixed setups for the
same reason (the setups are listed in each file).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from moebench.progress import human_count
from moebench.stats import ci95_half_width, paired_ci95, welch_ci95


def pooled_runs(paths: list[str], quality: str) -> dict[str, dict[int, dict]]:
    """{arm label: {seed: run record}}; a duplicate run must carry the same quality.
    ``FILE@TAG`` appends TAG to the labels of FILE's arms (labels are unique only within a file)."""
    arms: dict[str, dict[int, dict]] = {}
    for spec in paths:
        path, _, tag = spec.partition("@")
        path = Path(path)
        for run in json.loads(path.read_text())["runs"]:
            if run.get("setup"):  # a file drawn with --allow-mixed: the label is only unique within its setup
                run = {**run, "label": f"{run['label']} [{run['setup']}]"}
            if tag:
                run = {**run, "label": f"{run['label']} {tag}"}
            seen = arms.setdefault(run["label"], {}).get(run["seed"])
            if seen is not None and seen[quality] != run[quality]:
                sys.exit(f"compare_arms: {run['label']} seed {run['seed']} is {seen[quality]} in one file "
                         f"and {run[quality]} in {path}: not the same run")
            arms[run["label"]].setdefault(run["seed"], run)
    return arms


def pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def apart(vals: list[float], ref: list[float]) -> str:
    """How far apart the two arms' own 95% intervals of the mean are (the bar "non-overlapping
    intervals"): "apart by X" points between them, or "overlap by X", the length they share."""
    (low_a, high_a), (low_b, high_b) = (interval(v) for v in (vals, ref))
    gap = 100 * (max(low_a, low_b) - min(high_a, high_b))  # > 0: disjoint; < 0: minus the shared stretch
    if math.isnan(gap):
        return "n/a"
    size = f"{abs(gap):.2f}" if abs(gap) >= 0.01 else f"{abs(gap):.1g}"
    return f"apart by {size}" if gap > 0 else f"overlap by {size}"


def interval(values: list[float]) -> tuple[float, float]:
    half = ci95_half_width(values)
    mean = statistics.fmean(values)
    return (mean - half, mean + half) if half is not None else (math.nan, math.nan)


def table(arms: dict[str, dict[int, dict]], references: list[str], quality: str, only: list[str] | None = None,
          params: bool = False, bar: bool = False, train_flops: bool = False) -> str:
    """The Markdown table; ``only``: these arms' rows (the references are compared with all the same);
    ``params``: a column of the arms' parameter counts; ``train_flops``: of their total training FLOPs;
    ``bar``: per reference, how far apart the two arms' own intervals are."""
    for ref in [*references, *(only or [])]:
        if ref not in arms:
            sys.exit(f"compare_arms: no arm is labelled {ref!r}; arms: {', '.join(sorted(arms))}")
    values = {label: {seed: run[quality] for seed, run in runs.items()} for label, runs in arms.items()}
    order = sorted(values, key=lambda label: -statistics.fmean(values[label].values()))
    if only:
        order = [label for label in order if label in only]
    head = ["arm", "seeds", f"{quality} % (mean +- 95%)", "per seed", "GFLOPs/img", *(["params"] if params else []),
            *(["training TFLOPs"] if train_flops else [])]
    for ref in references:
        head += [f"vs {ref} (Welch)", f"vs {ref} (paired)", *([f"vs {ref} (arm intervals)"] if bar else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in order:
        vals = values[label]
        half = ci95_half_width(list(vals.values()))
        cells = [label, str(len(vals)), f"{pct(statistics.fmean(vals.values()))} +- {pct(half)}",
                 ", ".join(pct(vals[s]) for s in sorted(vals)),
                 f"{statistics.fmean(r['gflops_per_image'] for r in arms[label].values()):.4f}"]
        if params:
            cells.append(human_count(statistics.fmean(r["params_total"] for r in arms[label].values())))
        if train_flops:  # (records made before the axis existed have none)
            totals = [r.get("train_gflops_total") for r in arms[label].values()]
            cells.append(f"{statistics.fmean(totals) / 1e3:.1f}" if None not in totals else "n/a")
        for ref in references:
            if label == ref:
                cells += ["", "", *([""] if bar else [])]
                continue
            diff = statistics.fmean(vals.values()) - statistics.fmean(values[ref].values())
            welch = welch_ci95(list(vals.values()), list(values[ref].values()))
            pdiff, phalf, n = paired_ci95(vals, values[ref])
            mark = lambda d, h: "**" if h is not None and abs(d) > h else ""  # noqa: E731 (outside the interval)
            cells += [f"{mark(diff, welch)}{pct(diff, True)} +- {pct(welch)}{mark(diff, welch)}",
                      f"{mark(pdiff, phalf)}{pct(pdiff, True)} +- {pct(phalf)}{mark(pdiff, phalf)} ({n})"]
            if bar:
                cells.append(apart(list(vals.values()), list(values[ref].values())))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def effect_table(arms: dict[str, dict[int, dict]], tag: str, quality: str, only: list[str] | None = None) -> str:
    """What the files tagged ``tag`` (``FILE@TAG``) change for each arm they share with the untagged
    files: the paired difference, tagged minus untagged, over the seeds both have, with its 95%
    interval and the difference of each seed; most negative first."""
    values = {label: {seed: run[quality] for seed, run in runs.items()} for label, runs in arms.items()}
    pairs = {label: paired_ci95(values[f"{label} {tag}"], values[label]) for label in values
             if f"{label} {tag}" in values and (not only or label in only)}
    if not pairs:
        sys.exit(f"compare_arms: no arm has both a run tagged {tag!r} and an untagged run; arms: {', '.join(sorted(arms))}")
    head = ["arm", f"{tag} minus without: {quality} % (paired, 95%)", "per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in sorted(pairs, key=lambda label: (pairs[label][0], label)):
        diff, half, n = pairs[label]
        seeds = sorted(set(values[f"{label} {tag}"]) & set(values[label]))
        mark = "**" if half is not None and abs(diff) > half else ""  # the interval excludes 0
        lines.append(f"| {label} | {mark}{pct(diff, True)} +- {pct(half)}{mark} ({n}) | "
                     + ", ".join(pct(values[f"{label} {tag}"][s] - values[label][s], True) for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="pareto.json files of one setup (FILE@TAG: TAG appended to its labels)")
    parser.add_argument("--reference", action="append", default=[], help="arm label to compare every arm with")
    parser.add_argument("--quality", default="top1", help="quality key of the run records (default top1)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--arm", action="append", default=[], help="show only this arm (repeatable; default: all)")
    parser.add_argument("--params", action="store_true", help="add a column of the arms' parameter counts")
    parser.add_argument("--train-flops", action="store_true",
                        help="add a column of the arms' total training FLOPs (train_gflops_total, in TFLOPs)")
    parser.add_argument("--bar", action="store_true", help="per reference, add a column saying how far apart the two "
                        "arms' own 95%% intervals are (\"apart by\") or how far they overlap")
    parser.add_argument("--effect-of", metavar="TAG", help="instead: per arm, runs of the files tagged TAG minus the "
                        "untagged runs, paired by seed (e.g. FILE@RandAugment)")
    return parser


def render(args: argparse.Namespace, files: list[str]) -> str:
    """The table ``args`` ask for, of the pareto.json ``files``."""
    arms = pooled_runs(files, args.quality)
    if args.effect_of:
        return effect_table(arms, args.effect_of, args.quality, args.arm)
    return table(arms, args.reference, args.quality, args.arm, args.params, args.bar, args.train_flops)


def main(argv: list[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    text = render(args, args.files)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
