"""The command lines of ``moebench pareto|inspect|probe|measure|bench``, torch-free.

Each command's parser and every check its arguments allow alone (paths on disk, ranges, names)
live here. ``moebench`` (cli.py) parses and checks first and imports the command's module only
then, so ``--help`` and a refusal answer before torch is imported (9-50 s on a loaded machine);
each module's ``main(argv)`` parses here too, so there is one parser per command.

A refusal is a UserError: one line, ``moebench: error: ...``, and exit code 2 (argparse's own
refusals included).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Callable

from . import rundirs, status
from .datasource import NAMES
from .errors import ConfigError, ProbeError, UserError

# ----------------------------------------------------------------------------- shared


class UsageError(UserError):
    """argparse's own refusals (a bad type, a missing argument, an unknown choice), as a user error."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, printed as one line (``moebench: error: ...; see `moebench X
    --help```) instead of the usage and an exit; ``--help`` still prints and exits 0."""

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """parse_args, with "did you mean" for a misspelt option."""
        args, extra = self.parse_known_args(argv)
        if extra:
            unknown = extra[0]
            options = [option for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(unknown.split("=", 1)[0], options, n=1) if unknown.startswith("-") else []
            self.error(f"unrecognized argument {unknown!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        return args


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
        if not value >= 0:  # (nan too)
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def in_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    return parse


# ----------------------------------------------------------------------------- pareto

QUALITY = "top1"  # the final model's test top-1
QUALITIES = ("top1", "top1_at_best_val", "val_top1_best")  # val_top1_best: what a search (search.objectives) sees

PARETO_READING = """\
Runs that differ only in seed form an arm: its mean top-1, the standard deviation
over seeds and the half-width of a 95% t-interval of the mean (pareto_arms.csv,
"arms" in pareto.json, error bars in pareto.png). The frontier is drawn over arm
means. Reading two arms: intervals that do not overlap mean a difference larger
than seed noise; overlapping intervals do not settle the ordering either way
(more seeds narrow them). One seed gives no interval.
Timings come from `moebench measure` (cost_measured) where a run has them."""


def quality_key(value: str) -> str:
    if value in QUALITIES or (value.startswith("probe.") and len(value.split(".")) == 3):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: choose {', '.join(QUALITIES)} or probe.<data>.<k>shot")


def pareto_parser() -> Parser:
    parser = Parser(prog="moebench pareto", description="Cost/quality Pareto frontier of runs.",
                    epilog=PARETO_READING, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep dirs and/or run dirs (several are combined)")
    parser.add_argument("--out", type=Path, help="where to write pareto.*; default: the path if only one")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="runs of different setups (data, model, schedule): one frontier per setup")
    parser.add_argument("--quality", default=QUALITY, type=quality_key,
                        help="quality axis: final model's test top-1 (top1), test top-1 at the best validation "
                             "epoch (top1_at_best_val), the best validation top-1 (val_top1_best: what a "
                             "hydra/sweeper=optuna search maximizes), or a few-shot probe's mean "
                             "(probe.<data>.<k>shot, from moebench probe)")
    parser.add_argument("--include-init-cost", action="store_true",
                        help="add the training FLOPs of the run an upcycled run started from (init_from) to its "
                             "training FLOPs axis")
    parser.add_argument("--wandb-mode", default=None, choices=["offline", "online", "disabled"],
                        help="default: as the runs were logged (disabled when none of them used W&B)")
    parser.add_argument("--wandb-project", default=None, help="default: the runs' project")
    parser.add_argument("--wandb-group", default=None, help="default: the sweep's group")
    parser.add_argument("--wandb-report", action="store_true",
                        help="also save a W&B report of the runs (W&B online; pip install 'moebench[report]')")
    return parser


def check_pareto(args: argparse.Namespace) -> None:
    rundirs.check_paths(args.paths)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give a directory for pareto.*")


# ----------------------------------------------------------------------------- inspect

MAX_IMAGES_DRAWN = 16


def inspect_parser() -> Parser:
    parser = Parser(prog="moebench inspect", allow_abbrev=False,
                    description="Pictures of what a trained run's routers do (RUN_DIR/inspect/).")
    parser.add_argument("run_dir", type=Path, help="a run dir holding a checkpoint (last.pt)")
    parser.add_argument("--images", type=in_range(1, MAX_IMAGES_DRAWN), default=4,
                        help=f"test images to draw routing for, 1..{MAX_IMAGES_DRAWN} (default 4)")
    parser.add_argument("--checkpoint", default="last.pt", help="checkpoint file in the run dir (default last.pt)")
    parser.add_argument("--data-root", default=None,
                        help="where the run's dataset lies, if its recorded data.root is relative to elsewhere")
    parser.add_argument("--max-images", type=positive, default=None,
                        help="statistics over at most this many test images (default: the whole test split)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the pictures to the run's W&B run")
    return parser


def check_inspect(args: argparse.Namespace) -> None:
    rundirs.checkpoint_path(args.run_dir, args.checkpoint)


# ----------------------------------------------------------------------------- probe

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_DRAWS = 3
PROBE_NAMES = tuple(name for name in NAMES if name != "imagefolder")  # --data NAME (an ImageFolder: its root)


def parse_shots(text: str | list) -> list[int]:
    """"1,5,10" (or a list) -> [1, 5, 10], sorted, without repeats; ProbeError unless all are ints >= 1."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        shots = sorted({int(str(s).strip()) for s in items if str(s).strip()})
    except ValueError:
        raise ProbeError(f"shots must be positive integers separated by commas (e.g. 1,5,10,25), got {text!r}") from None
    if not shots or shots[0] < 1:
        raise ProbeError(f"shots must be positive integers separated by commas (e.g. 1,5,10,25), got {text!r}")
    return shots


def probe_data_kind(spec: str | None) -> str:
    """"own" (the run's dataset), "name" (a loader's) or "dir" (an ImageFolder root); ProbeError otherwise."""
    if spec in (None, "", "own"):
        return "own"
    if spec in PROBE_NAMES:
        return "name"
    if Path(spec).expanduser().is_dir():
        return "dir"
    raise ProbeError(f"--data {spec!r} is neither a dataset name ({', '.join(PROBE_NAMES)}, own) nor a directory "
                     "(an ImageFolder root with train/ and test/)")


def check_eval_probe(cfg) -> None:
    """Reject a bad ``eval.probe`` of ``moebench train`` (a config, resolved or not) before training
    starts: one line, the key named."""
    probe = (cfg.get("eval") or {}).get("probe") if hasattr(cfg, "get") else None
    if not probe:
        return
    datasets = probe.get("datasets") or []
    if isinstance(datasets, str) or not all(isinstance(d, str) and d for d in datasets):
        raise ConfigError(f"eval.probe.datasets must be a list of dataset names, 'own' or ImageFolder roots, "
                          f"got {datasets!r}")
    try:
        parse_shots(list(probe.get("shots") or []))
    except ProbeError as err:
        raise ConfigError(f"eval.probe.{err}") from None
    if not isinstance(probe.get("draws"), int) or probe.get("draws") < 1:
        raise ConfigError(f"eval.probe.draws must be an int >= 1, got {probe.get('draws')!r}")


def probe_parser() -> Parser:
    parser = Parser(
        prog="moebench probe", allow_abbrev=False,
        description="Few-shot linear probe (closed-form ridge on frozen pre-logit features); "
                    "writes result.json probe.<data>.<k>shot.")
    parser.add_argument("run_dir", type=Path, help="a run dir holding a checkpoint (last.pt) and result.json")
    parser.add_argument("--data", default=None,
                        help="dataset to probe: a name (" + ", ".join(PROBE_NAMES)
                             + ") or an ImageFolder root; default: the run's own dataset")
    parser.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)), help="examples per class, e.g. 1,5,10,25")
    parser.add_argument("--draws", type=positive, default=DEFAULT_DRAWS,
                        help=f"random k-shot draws per k (mean and spread; default {DEFAULT_DRAWS})")
    parser.add_argument("--checkpoint", default="last.pt", help="checkpoint file in the run dir (default last.pt)")
    parser.add_argument("--data-root", default=None, help="root for a named dataset, or the run's own dataset root "
                                                           "when its recorded data.root is relative to elsewhere")
    parser.add_argument("--max-test", type=positive, default=None, help="score on at most this many test images")
    parser.add_argument("--seed", type=int, default=0, help="seeds the held-out set and the k-shot draws")
    return parser


def check_probe(args: argparse.Namespace) -> None:
    rundirs.checkpoint_path(args.run_dir, args.checkpoint)
    parse_shots(args.shots)
    probe_data_kind(args.data)


# ----------------------------------------------------------------------------- measure

WARMUP_MIN_S = 0.3  # least warm-up of a timed call, in seconds (cost.warm_up: more until the times settle)
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def measure_parser() -> Parser:
    parser = Parser(
        prog="moebench measure",
        description="Re-time finished runs together in one quiet process; writes cost_measured into result.json.")
    parser.add_argument("paths", nargs="+", help="run dirs and/or sweep dirs")
    parser.add_argument("--rounds", type=positive, default=5, help="rounds over all runs; medians are kept (default 5)")
    parser.add_argument("--repeats", type=positive, default=5, help="timed calls per run and round (default 5)")
    parser.add_argument("--train", action="store_true", help="also time a training step (on a copy of the model)")
    parser.add_argument("--batch-size", type=positive, default=None,
                        help="inference batch (default: each run's cost.batch_size)")
    parser.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--warmup-s", type=non_negative(float), default=WARMUP_MIN_S,
                        help=f"least warm-up per call before timing, in seconds (default {WARMUP_MIN_S}); "
                             "it also goes on until the times settle (at most 2 s or this)")
    return parser


def check_measure(args: argparse.Namespace) -> None:
    if not DEVICE.fullmatch(args.device):
        raise UserError(f"--device {args.device!r}: choose cpu or cuda[:N]")
    rundirs.check_paths(args.paths)


# ----------------------------------------------------------------------------- bench

BENCH_DESCRIPTION = "`moebench bench`: the router layers against dense, the machine's matmul peak and public ports."
PEER_REPOS = (("soft", "soft-moe-pytorch", "soft_moe_pytorch"), ("st", "st-moe-pytorch", "st_moe_pytorch"))


def unsafe_peers(root: Path) -> str | None:
    """Why importing Python from ``root`` would run code someone else could have put there, or None.
    Importing runs ``__init__.py``: ``root``, the peer dirs and every file under their packages must be
    owned by this user (or root) and writable by no one else (a world-writable /tmp is the case in point)."""
    paths = [root]
    for _, repo, package in PEER_REPOS:
        if (root / repo).exists():
            paths.append(root / repo)
            if (root / repo / package).exists():
                paths += [root / repo / package, *(root / repo / package).rglob("*")]
    me = os.getuid()
    for path in paths:
        info = path.stat()
        if info.st_uid not in (me, 0):
            return f"{path} is owned by another user (uid {info.st_uid})"
        if info.st_mode & 0o022:
            return f"{path} is writable by other users (mode {info.st_mode & 0o777:o}); chmod go-w it"
    return None


def bench_parser() -> Parser:
    parser = Parser(prog="moebench bench", description=BENCH_DESCRIPTION)
    parser.add_argument("--dim", type=positive, default=192, help="token width d of every layer (default 192: ViT-Ti)")
    parser.add_argument("--hidden", type=positive, default=768, help="expert / MLP hidden width (default 768)")
    parser.add_argument("--tokens", type=positive, default=64, help="tokens per example (default 64)")
    parser.add_argument("--batch", type=positive, default=128, help="examples per timed forward+backward (default 128)")
    parser.add_argument("--experts", type=positive, nargs="+", default=[8, 16, 32, 64, 128, 256],
                        help="expert counts of the growth section (default 8 16 32 64 128 256)")
    parser.add_argument("--repeats", type=positive, default=7, help="timed rounds; medians are reported (default 7)")
    parser.add_argument("--warmup", type=non_negative(int), default=2,
                        help="untimed calls per layer before the rounds (default 2)")
    parser.add_argument("--peers", type=Path, default=None,
                        help="directory holding snapshots of soft-moe-pytorch/ and st-moe-pytorch/ (skipped if absent); "
                             "their code is imported, so it must be yours and writable by no one else")
    parser.add_argument("--only", default=None, help="time only the training layers whose name contains this")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference section")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    return parser


def check_bench(args: argparse.Namespace) -> None:
    if args.peers is None:
        return
    if not args.peers.is_dir():
        raise UserError(f"--peers {args.peers} is not a directory")
    unsafe = unsafe_peers(args.peers)
    if unsafe:  # the peers' Python runs with this user's rights: only from a place no one else can write to
        raise UserError(f"refusing to import peers from --peers {args.peers}: {unsafe}")


# ----------------------------------------------------------------------------- all of them

COMMANDS = {  # command -> (parser, checks)
    "pareto": (pareto_parser, check_pareto),
    "inspect": (inspect_parser, check_inspect),
    "probe": (probe_parser, check_probe),
    "measure": (measure_parser, check_measure),
    "bench": (bench_parser, check_bench),
}


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """The checked arguments of ``moebench COMMAND ARGV``; UserError (one line) when they cannot do.
    ``--help`` prints and exits 0 (SystemExit), as argparse does."""
    parser, check = COMMANDS[command]
    args = parser().parse(argv)
    check(args)
    return args


def refusal(err: UserError) -> int:
    print(f"moebench: error: {err}", file=sys.stderr, flush=True)
    return status.EXIT_BAD_INPUT


def call(command: str, run: Callable[[argparse.Namespace], int], argv: list[str]) -> int:
    """``run`` on the checked arguments of ``moebench COMMAND ARGV`` (a module's ``main``), or the refusal."""
    try:
        args = parse(command, argv)
    except UserError as err:
        return refusal(err)
    return run(args)
