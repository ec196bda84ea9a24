"""Check that every committed ``experiments/results/**/pareto.json`` still aggregates as committed.

The results dirs keep the aggregate only (pareto.json/csv/png; the runs'
result.json files were not committed), so the check works from each file's
per-run rows, which hold every number an arm is made of (label, seed, quality,
cost axes):

- arms: the rows regrouped by today's ``pareto.arm_rows`` give the committed
  arms exactly: labels, seeds, means, standard deviations, 95% intervals,
  mean costs and frontier flags (and ``compare_arms`` the committed Welch
  comparisons), so the statistics did not change;
- labels: each run's router label rebuilt by today's code from the config keys
  the row records (router, experts, slots, k, capacity factor, BPR, dispatch,
  combine) begins the committed label (keys a row does not record, e.g.
  ``router.scale_init``, can only add words after it).

Files from before arms existed (no ``arms`` key) get the label check only.

    python experiments/check_pareto_records.py [RESULTS_DIR ...]

Exit code 0 when every file matches; otherwise the differences, one a line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from moebench.pareto import CONFIG_KEYS, Run, arm_rows, compare_arms

RESULTS = Path(__file__).resolve().parent / "results"
REL = 1e-12  # the same arithmetic gives the same floats; this only forgives the last bit


def differences(old, new, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = [f"{where}: key {key!r} {'added' if key in new else 'missing'}" for key in set(old) ^ set(new)]
        for key in sorted(set(old) & set(new)):
            out += differences(old[key], new[key], f"{where}.{key}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{where}: {len(old)} items, now {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        same = math.isclose(old, new, rel_tol=REL, abs_tol=0.0) or (math.isnan(old) and math.isnan(new))
        return [] if same else [f"{where}: {old!r} -> {new!r}"]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def row_config(row: dict) -> dict:
    """The nested config a row records (CONFIG_KEYS: column -> dotted key)."""
    config: dict = {}
    for column, dotted in CONFIG_KEYS.items():
        if row.get(column) is None:
            continue
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = row[column]
    return config


def check(pareto_json: Path) -> list[str]:
    committed = json.loads(pareto_json.read_text())
    name, quality, rows = pareto_json.parent.name, committed["quality"], committed["runs"]
    found = []
    for row in rows:
        label = Run(Path(row["run"]), "completed", row_config(row)).label
        if not row["label"].startswith(label):
            found.append(f"{name}: run {row['run']}: label {row['label']!r} does not start with {label!r}")
    if "arms" not in committed:
        return found
    rows = [{"setup": "", **row} for row in rows]
    axes = committed["cost_axes"]
    arms = arm_rows([dict(row) for row in rows], axes, quality)
    found += differences(committed["arms"], json.loads(json.dumps(arms)), f"{name}.arms")
    if "comparisons" in committed:
        comparisons = compare_arms(rows, arms, quality)
        found += differences(committed["comparisons"], json.loads(json.dumps(comparisons)), f"{name}.comparisons")
    return found


def main(argv: list[str]) -> int:
    files = [Path(a) / "pareto.json" for a in argv] or sorted(RESULTS.rglob("pareto.json"))
    bad = 0
    for pareto_json in files:
        found = check(pareto_json)
        bad += bool(found)
        arms = len(json.loads(pareto_json.read_text()).get("arms", []))
        what = f"{arms} arms" if arms else "labels only"
        print(f"{'ok  ' if not found else 'DIFF'} {pareto_json.parent.name} ({what})"
              + "".join(f"\n     {d}" for d in found[:10]))
    print(f"{len(files) - bad} of {len(files)} committed pareto.json files aggregate as committed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
