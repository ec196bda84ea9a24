"""Drop from a run queue the runs whose records are committed: a study finished on a new machine.

    ... | python experiments/unrecorded.py cifar10=results/modern_routers_cifar10/pareto.json ... | run_queue.sh ...

A queue line is run_queue.sh's ``NAME SEED TAG OVERRIDES...``. A sweep's run dirs are not committed,
its pareto.json is, so a queue run again on a machine without the dirs would train every committed
run again. This composes each line's config as ``moebench train`` would, names its arm as
``moebench pareto`` does (the router's label), and drops the line when the pareto.json given for its
NAME already holds that arm at that seed. Lines of a NAME without a file, or whose arm the file
does not hold, pass through unchanged. Arms of one NAME that share a label are told apart as a
report of them tells them apart (the keys in which they differ, appended): arms queued in a sweep
of their own match the records their own report wrote. A label the file disambiguates otherwise
does not match: such a run trains again (and pooling it checks it reproduced the record).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moebench.build import conf_dir
from moebench.pareto.arms import arm_labels, arm_of
from moebench.pareto.records import Run


def queued_run(overrides: list[str]) -> Run:
    """The run ``moebench train OVERRIDES`` makes, as far as its arm goes (inside initialize_config_dir of
    moebench's conf/): its config, the router's keys resolved (the label reads them)."""
    cfg = compose("train", overrides=overrides)
    config = OmegaConf.to_container(cfg, resolve=False)
    config["router"] = OmegaConf.to_container(cfg.router, resolve=True)
    return Run(Path(), "queued", config=config)


def recorded(path: Path) -> set[tuple[str, int]]:
    return {(row["label"], row["seed"]) for row in json.loads(path.read_text())["runs"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="*", metavar="NAME=PARETO_JSON",
                        help="the committed pareto.json of the queue lines named NAME")
    args = parser.parse_args(argv)
    files = dict(pair.split("=", 1) for pair in args.records)
    held = {name: recorded(Path(path)) for name, path in files.items() if Path(path).exists()}
    lines = sys.stdin.readlines()
    runs: dict[int, Run] = {}  # line index -> its run, for the lines of a NAME with records
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        for i, line in enumerate(lines):
            fields = line.split()
            if len(fields) >= 3 and fields[0] in held:
                runs[i] = queued_run([*fields[3:], f"seed={fields[1]}"])
    labels = {}  # each NAME's arms labelled among themselves, as `moebench pareto` of those runs would
    for name in held:
        mine = [run for i, run in runs.items() if lines[i].split()[0] == name]
        labels.update({(name, arm): label for arm, label in arm_labels(mine).items()})
    for i, line in enumerate(lines):
        if i in runs:
            name, seed, tag = line.split()[:3]
            if (labels[name, arm_of(runs[i])], int(seed)) in held[name]:
                print(f"unrecorded.py: {name} seed {seed} {tag} is in the committed records: skipped", file=sys.stderr)
                continue
        sys.stdout.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
