"""The `moebench` command: one small dispatcher over the subcommands.

A subcommand is a module of this package with ``run(args: argparse.Namespace) -> int`` (and
``main(argv)``, the same from a list of strings), and a parser with its checks in arguments.py;
adding one is one line in ``COMMANDS`` and one in ``arguments.COMMANDS``. The command line is parsed
and checked before the module is imported, so ``--help`` and a refusal never wait for torch.
``train`` is a Hydra app: its command line is checked by preflight.py.
"""

from __future__ import annotations

import importlib
import os
import sys

from . import arguments, invocation, plugins, status
from .allocator import tune_cpu_allocator
from .errors import UserError

COMMANDS = {  # name -> (module, one-line help)
    "train": ("train", "train, evaluate and measure a model (a Hydra app: key=value overrides,\n"
                       "           -m/--multirun sweeps, --cfg job, --help, experiment=NAME)"),
    "pareto": ("pareto", "cost/quality Pareto frontier of sweep or run dirs: arms over seeds\n"
                         "           (pareto.csv, pareto_arms.csv, pareto.json, pareto.png)"),
    "measure": ("measure", "re-time finished runs together in one quiet process (cost_measured)"),
    "bench": ("bench", "time each router's forward+backward as a ratio to the dense MLP"),
    "inspect": ("inspection", "pictures of what a trained run's routers do (RUN_DIR/inspect/index.md)"),
    "probe": ("probe", "few-shot linear probe on a trained run's frozen features (result.json probe.*)"),
}

HELP_FLAGS = {"--help", "-h"}

EXAMPLES = """
Examples:
  moebench train router=soft experts=128
  moebench train -m router=soft,tokens_choice,experts_choice,dense experts=8,32 seed=0,1,2
  moebench measure multirun/2026-11-25/10-00-00 && moebench pareto multirun/2026-11-25/10-00-00
"""


def usage() -> str:
    lines = ["usage: moebench <command> [arguments]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n" + EXAMPLES


def sleep_idle_openmp_threads() -> None:
    """Let torch's idle OpenMP threads sleep instead of spinning, unless ``OMP_WAIT_POLICY`` is set.

    By default an OpenMP thread spins after each parallel region, waiting for the next; on a
    machine where other processes hold the cores, the spinning takes the time slices the working
    thread needs. Measured here with other jobs running (load 6-7 on 2 cores), the digits job with
    2 threads: 51 s/epoch spinning, 4 s/epoch sleeping, 10 s/epoch on 1 thread. Read by the OpenMP
    runtime when torch loads it, so this runs before any torch import.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def train(args: list[str]) -> int:
    """`moebench train`: the help, and the checks of the command line that read the config alone,
    before torch is imported (seconds, tens of seconds on a loaded machine), so that both answer at once."""
    from datetime import datetime

    from . import preflight, resolvers, search

    resolvers.register(stamp=datetime.now().strftime)  # (train.main registers the stamp all ranks share)
    if HELP_FLAGS & set(args):
        from .confhelp import train_help

        return train_help(args)
    checked = None
    if "WORLD_SIZE" not in os.environ:  # under torchrun the ranks agree on one refusal first (train.main)
        try:
            search.prepare_preset(args)  # hydra/sweeper=optuna composes moebench's preset
            checked = preflight.check_config(args, preflight.conf_dir())
        except UserError as err:  # nothing was written
            print(f"moebench: error: {err}", file=sys.stderr, flush=True)
            return status.EXIT_BAD_INPUT
    from . import train as app

    return app.main(args, checked)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    invocation.remember(sys.argv[0])  # hints name the command that started us (train rewrites sys.argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"moebench: unknown command {command!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sleep_idle_openmp_threads()
    tune_cpu_allocator()
    try:
        plugins.load()  # routers from outside moebench (MOEBENCH_PLUGINS): every subcommand knows them
    except UserError as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
    parsed = None
    if command != "train":  # its arguments alone, before torch is imported (arguments.py)
        try:
            parsed = arguments.parse(command, args)
        except UserError as err:
            return arguments.refusal(err)
        except SystemExit as done:  # --help, printed
            return done.code or 0
    try:
        if command == "train":
            return train(args)
        module = importlib.import_module(f".{COMMANDS[command][0]}", __package__)
        return module.run(parsed)
    except KeyboardInterrupt:
        print("moebench: interrupted", file=sys.stderr)
        return 130
