"""Redraw a committed pareto.png from the pareto.json beside it, with a title naming data and setup.

    python experiments/replot.py results/tinyimagenet_all_arms/pareto.json \
        --title "Tiny-ImageNet-200, experiment=tinyimagenet: every arm of recipes 8, 11 and 13"

A sweep's run dirs are not committed, so `moebench pareto` cannot draw its picture again; the
pareto.json keeps what the picture shows (every run's costs and quality, the arms, the frontier
flags), and this draws it with moebench's own plot code. The arm and seed counts are appended
from the records. Nothing else is rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moebench.pareto.arms import arm_rows
from moebench.pareto.plot import plot


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def title_of(summary: dict, title: str) -> str:
    """``title (15 arms, 3-6 seeds each)``; one arm: ``(1 arm, 3 seeds)``."""
    arms = summary["arms"]
    seeds = sorted({arm["seeds"] for arm in arms})
    seed_text = counted(seeds[0], "seed") if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds"
    return f"{title} ({counted(len(arms), 'arm')}, {seed_text}{' each' if len(arms) > 1 else ''})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, help="a pareto.json; its pareto.png is redrawn")
    parser.add_argument("--title", required=True, help="data and setup (the arm and seed counts are appended)")
    args = parser.parse_args(argv)
    summary = json.loads(args.records.read_text())
    if "arms" not in summary:  # recipes 2-5's records predate the arm summary: rebuilt from their runs
        summary["runs"] = [{"setup": "", **run} for run in summary["runs"]]
        summary["arms"] = arm_rows(summary["runs"], summary["cost_axes"], summary["quality"])
    drawn = plot(summary["runs"], summary["arms"], summary["cost_axes"], summary["quality"],
                 args.records.parent / "pareto.png", title=title_of(summary, args.title))
    print(f"wrote {args.records.parent / 'pareto.png'}: {drawn['title']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
