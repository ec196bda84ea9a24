"""The `moebench` command: one small dispatcher over the subcommands."""

from __future__ import annotations

import sys

from .allocator import tune_cpu_allocator

USAGE = """usage: moebench <command> [arguments]

commands:
  train    train, evaluate and measure a model (a Hydra app: key=value overrides,
           -m/--multirun sweeps, --cfg job, --help, experiment=NAME)
  pareto   cost/quality Pareto frontier of sweep or run dirs (pareto.csv/.json/.png)
  bench    time each router's forward+backward as a ratio to the dense MLP
  inspect  pictures of what a trained run's routers do (RUN_DIR/inspect/index.md)
  probe    few-shot linear probe on a trained run's frozen features (result.json probe.*)

Examples:
  moebench train router=soft experts=128
  moebench train -m router=soft,tokens_choice,experts_choice,dense experts=8,32
"""

COMMANDS = ("train", "pareto", "bench", "inspect", "probe")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    tune_cpu_allocator()
    try:
        if command == "train":
            from .train import main as train_main

            return train_main(args)
        if command == "pareto":
            from .pareto import main as pareto_main

            return pareto_main(args)
        if command == "bench":
            from .bench import main as bench_main

            return bench_main(args)
        if command == "inspect":
            from .inspection import main as inspect_main

            return inspect_main(args)
        if command == "probe":
            from .probe import main as probe_main

            return probe_main(args)
    except KeyboardInterrupt:
        print("moebench: interrupted", file=sys.stderr)
        return 130
    print(f"moebench: unknown command {command!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
