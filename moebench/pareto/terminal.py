"""The frontier tables and the gaps between arms, printed to the terminal.
"""

from __future__ import annotations

import sys


from .humanize import human, human_percent
from .records import COST_AXES, Run


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
        console.print(f"left out: {run.path} ({reason}{': ' + run.error if run.error else ''})",
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
