"""Few-shot probe results of run dirs, per arm and probe dataset: a table and a JSON record.

    python experiments/probe_table.py multirun/tinyimagenet_routers --reference dense \
        --json results/transfer/tinyimagenet_models.json --markdown results/transfer/tinyimagenet_models.md

`moebench probe` writes each run's figures into its result.json under
probe.<data>.<k>shot; run dirs are not committed, so this keeps every run's
probe summaries (arm label, seed, mean over draws per k) in one JSON file and
prints per arm and dataset the mean over seeds with its 95% t-interval, and
against the reference arm the difference of means with its Welch interval and,
over shared seeds, the paired one. Arms are labelled as `moebench pareto`
labels them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from moebench.pareto import arm_labels, arm_of, find_runs
from moebench.stats import ci95_half_width, paired_ci95, welch_ci95


def collect(paths: list[str]) -> list[dict]:
    """One record per finished run that holds probe results."""
    runs = [run for run in find_runs(paths) if run.status == "completed"]
    labels = arm_labels(runs)
    records = []
    for run in runs:
        probe = json.loads((run.path / "result.json").read_text()).get("probe") or {}
        if not probe:
            continue
        records.append({
            "run": run.path.name, "label": labels[arm_of(run)], "seed": run.get("seed"),
            "trained_on": Path(str(run.get("data.root") or run.get("data.name"))).name,
            "test_top1": run.quality.get("top1"),
            "probe": {data: {k: {"top1_mean": v["top1_mean"], "top1_std": v["top1_std"], "draws": v["draws"]}
                             for k, v in by_k.items()} for data, by_k in probe.items()},
        })
    return records


def fmt(values: list[float]) -> str:
    half = ci95_half_width(values)
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f}" if half is None else f"{mean:.2f} ± {100 * half:.2f}"


def tables(records: list[dict], reference: str | None) -> str:
    datasets = sorted({data for r in records for data in r["probe"]})
    arms = list(dict.fromkeys(r["label"] for r in records))
    lines = []
    for data in datasets:
        shots = sorted({k for r in records for k in r["probe"].get(data, {})}, key=lambda k: int(k.removesuffix("shot")))
        lines += [f"### Probed on {data} (top-1 %, mean over seeds ± 95% t-interval)", "",
                  "| arm | seeds | " + " | ".join(shots) + (f" | 10shot vs {reference}: Welch | paired |" if reference else " |"),
                  "|---|---:|" + "---:|" * len(shots) + ("---:|---:|" if reference else "")]
        for arm in arms:
            runs = {r["seed"]: r for r in records if r["label"] == arm and data in r["probe"]}
            if not runs:
                continue
            cells = []
            for k in shots:
                values = [r["probe"][data][k]["top1_mean"] for r in runs.values() if k in r["probe"][data]]
                cells.append(fmt(values) if values else "")
            row = f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |"
            if reference:
                row += " " + compare(records, data, arm, reference) + " |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def compare(records: list[dict], data: str, arm: str, reference: str, k: str = "10shot") -> str:
    """'+d ± w | +p ± q': Welch and paired (by seed) 95% intervals of arm - reference on k-shot top-1."""
    def values(label):
        return {r["seed"]: r["probe"][data][k]["top1_mean"] for r in records
                if r["label"] == label and k in r["probe"].get(data, {})}
    a, b = values(arm), values(reference)
    if arm == reference or not a or not b:
        return " | "
    diff = 100 * (statistics.fmean(a.values()) - statistics.fmean(b.values()))
    welch = welch_ci95(list(a.values()), list(b.values()))
    paired_mean, paired, shared = paired_ci95(a, b)
    left = f"{diff:+.2f}" + ("" if welch is None else f" ± {100 * welch:.2f}")
    right = "" if not shared else f"{100 * paired_mean:+.2f}" + ("" if paired is None else f" ± {100 * paired:.2f}")
    return f"{left} | {right}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep dirs and/or run dirs")
    parser.add_argument("--reference", default=None, help="arm label to compare every arm against (10-shot)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-run records here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    args = parser.parse_args(argv)
    records = collect(args.paths)
    if not records:
        print(f"probe_table: no run under {', '.join(args.paths)} holds probe results (run `moebench probe` first)",
              file=sys.stderr)
        return 1
    text = tables(records, args.reference)
    print(text)
    for path, content in ((args.json, json.dumps(records, indent=1) + "\n"), (args.markdown, text)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
