"""Cost/quality Pareto frontiers over finished runs: files, terminal tables, a W&B run.

Reads run records (``result.json``) only; it never imports the training code (arm labels come from
the routers' own descriptions, moe/registry.py).
Used by ``moebench pareto PATH...`` and by ``ParetoCallback`` at the end of
every ``-m`` sweep.

The frontier of a set of points, for one cost axis: a point is on it unless
another is at least as cheap AND at least as good, and strictly better on one of
the two. So two points at the same place are both on it (neither beats the
other), and of two equally cheap points only the better one is.

Runs that differ only in ``seed`` form an *arm*; arms carry the mean, standard
deviation and 95% t-interval of their quality, and the arm frontier is computed
on the means. Runs trained on different data, models or schedules (a different
*setup*) never share a frontier: the command refuses to mix them unless asked,
then draws one frontier per setup.

The package by concern: ``records`` (reading run records, the cost axes),
``arms`` (setups, arms, rows, intervals, comparisons), ``plot`` (pareto.png),
``terminal`` (tables), ``wandb_run`` (the W&B run), ``humanize`` (numbers);
this module writes the files and is the CLI and the multirun callback.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from .. import arguments, checkpoint, distributed, report, status
from ..tracking import atomic_write_bytes, atomic_write_json, sweep_group
from .arms import (  # noqa: F401 (the package's API: moebench.pareto.X)
    arm_labels, arm_of, arm_rows, compare_arms, differing_keys, frontier_flags, per_seed, run_rows, setup_of,
    split_setups,
)
from .humanize import human, human_flops, human_mb, human_percent, si  # noqa: F401
from .plot import plot  # noqa: F401
from .records import (  # noqa: F401
    ARM_ONLY_KEYS, CONFIG_KEYS, COST_AXES, MEASURED_KEYS, NEUTRAL_KEYS, PARETO_LOCK, QUALITIES, QUALITY,
    REQUIRED_AXES, SETUP_KEYS, Axis, ParetoError, Run, _axis_value, _under, add_init_cost, find_runs, pareto_mask,
    read_run, usable, why_unusable,
)
from .terminal import print_gaps, print_tables  # noqa: F401
from .wandb_run import log_wandb  # noqa: F401


@contextlib.contextmanager
def sweep_lock(out_dir: Path):
    """Hold ``out_dir``'s pareto lock: two sweeps ending in one sweep dir write their files one after the other."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / PARETO_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks: the other sweep's aggregation takes seconds
        yield
    finally:
        os.close(fd)


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    if rows:  # every key of every row (pooled records of different ages carry different ones), in first-seen order
        writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)),
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ";".join(map(str, value)) if isinstance(value, list) else value
                             for key, value in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())


def aggregate(paths: list[str | Path], out_dir: Path, *, wandb_cfg: dict | None = None, show: bool = True,
              allow_mixed: bool = False, quality: str = QUALITY, include_init_cost: bool = False) -> dict:
    """Find the runs, group them into setups and arms, compute the frontiers, write
    pareto.csv (runs), pareto_arms.csv, pareto.json and pareto.png to ``out_dir``.
    ``include_init_cost``: training FLOPs (a required axis then) count the init_from runs' training.
    Runs are read and files written under ``out_dir``'s lock (sweep_lock); every file is replaced atomically."""
    if not all(Path(p).exists() for p in paths):
        find_runs(paths)  # its error: no such dir (before any out dir is made)
    with sweep_lock(Path(out_dir)):
        return _aggregate(paths, out_dir, wandb_cfg=wandb_cfg, show=show, allow_mixed=allow_mixed, quality=quality,
                          include_init_cost=include_init_cost)


def _aggregate(paths: list[str | Path], out_dir: Path, *, wandb_cfg: dict | None, show: bool, allow_mixed: bool,
               quality: str, include_init_cost: bool) -> dict:
    runs = find_runs(paths)
    required = REQUIRED_AXES + (("train_gflops_total",) if include_init_cost else ())
    with_init = add_init_cost(runs) if include_init_cost else 0
    out_dir = Path(out_dir)
    root = Path(os.path.commonpath([Path(p).resolve() for p in paths]))  # run names relative to it
    names = {run.path: str(run.path.relative_to(root)) if run.path.is_relative_to(root) and run.path != root
             else str(run.path) for run in runs}
    skipped = [(run, why_unusable(run, quality, required)) for run in runs if not usable(run, quality, required)]
    done = [run for run in runs if usable(run, quality, required)]
    setups = split_setups(done, names, allow_mixed)  # refuses mixed setups before anything is written
    axes = [axis for axis in COST_AXES if axis in REQUIRED_AXES or all(_axis_value(r, axis) for r in done)]
    rows = run_rows(names, setups, axes, quality)
    arms = arm_rows(rows, axes, quality)
    comparisons = compare_arms(rows, arms, quality)
    measured = sum(run.timing != "training" for run in done)
    train_measured = sum(run.timing == "measured" for run in done)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: (out_dir / name).resolve() for name in ("pareto.csv", "pareto_arms.csv", "pareto.json", "pareto.png")}
    summary = {
        "quality": quality,
        "cost_axes": axes,
        "timing": {"measured": measured, "training": len(done) - measured, "train_step_measured": train_measured},
        "init_cost_included": include_init_cost,
        "setups": [{"name": name, "runs": len(members)} for name, members in setups.items()],
        "arms": arms,
        "comparisons": comparisons,
        "runs": rows,
        "skipped": [{"run": str(run.path), "status": reason, "error": run.error} for run, reason in skipped],
    }
    atomic_write_json(files["pareto.json"], summary)
    write_csv(rows, files["pareto.csv"])
    write_csv(arms, files["pareto_arms.csv"])
    if rows:
        plot(rows, arms, axes, quality, files["pareto.png"], title=plot_title(done, arms))
    if show:
        if len(setups) > 1:
            print(f"{len(setups)} setups (runs differ in {', '.join(differing_keys([setup_of(r) for r in done]))}): "
                  "one frontier per setup")
        if measured:
            print(f"timings from `moebench measure` (cost_measured) for {measured} of {len(done)} runs"
                  + ("" if measured == len(done) else "; the others from training (not comparable: re-measure them)")
                  + ("" if train_measured == measured else
                     f"; training step time measured for {train_measured} of them (the rest: measure --train)"))
        upcycled = sum(run.init_from is not None for run in done)
        if include_init_cost:
            print(f"training FLOPs (total) include the init_from run's training for {with_init} of {len(done)} runs "
                  "(--include-init-cost)")
        elif upcycled:
            print(f"{upcycled} of {len(done)} runs started from another run's checkpoint (init_from); their training "
                  "FLOPs leave that run's out: --include-init-cost counts it")
        for arm in arms:  # e.g. dense under experts=8,32: one run trained twice, not two seeds
            if len(arm["runs"]) > arm["seeds"]:
                print(f"{arm['label']}: {len(arm['runs'])} runs of {arm['seeds']} seed(s) with one config; "
                      "runs that repeat a seed count once")
        print_tables(arms, axes, quality, skipped)
        print_gaps(comparisons, quality)
    if rows:
        summary["wandb_run_id"] = log_wandb(rows, arms, files["pareto.png"], wandb_cfg or {}, out_dir)
    summary["files"] = {name: str(path) for name, path in files.items() if path.exists()}
    return summary


def plot_title(runs: list, arms: list[dict]) -> str:
    """What the picture compares: data, model and schedule (the sweep dir's name is a clock time)."""
    def values(key: str) -> str:
        return "/".join(dict.fromkeys(str(run.get(key)) for run in runs if run.get(key) is not None)) or "?"

    seeds = sorted({arm["seeds"] for arm in arms})
    seed_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    return (f"{values('data.name')}, model {values('model.name')}, {values('train.epochs')} epochs: "
            f"{len(arms)} arm{'s' if len(arms) != 1 else ''}, {seed_text} seed{'s' if seeds[-1] != 1 else ''} each")


def arms_off_frontier(summary: dict) -> int:
    """Arms on no frontier of any cost axis."""
    return sum(not any(arm.get(f"frontier_{axis}") for axis in summary["cost_axes"]) for arm in summary["arms"])


def print_files(summary: dict) -> None:
    """The result files, as whole paths."""
    runs, arms, skipped = len(summary["runs"]), len(summary["arms"]), len(summary["skipped"])
    # Two counts that the old line ran together ("0 not on a frontier" while two arms were on none):
    # arms the frontiers leave out, and runs left out of the aggregation altogether.
    left_out = f"; {skipped} run{'s' if skipped != 1 else ''} left out (not completed or diverged)" if skipped else ""
    print(f"{runs} runs in {arms} arms, {arms_off_frontier(summary)} of them on no frontier{left_out} ->")
    for path in summary["files"].values():
        print(f"  {path}")


class ParetoCallback(Callback):
    """Hydra callback: aggregate a ``-m`` sweep into its sweep dir when it ends (and keep each launch's
    own multirun record when it starts: several launches may share one sweep dir)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        launch = status.this_launch()
        if launch is None or not distributed.current().is_main:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)  # Hydra's multirun.yaml is the latest launch's only
        atomic_write_bytes(sweep_dir / f"multirun.{launch}.yaml", OmegaConf.to_yaml(config).encode())

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists() or not distributed.current().is_main:  # under torchrun, rank 0 aggregates
            return
        wandb_cfg = {"mode": config.wandb.mode, "project": config.wandb.project, "entity": config.wandb.entity,
                     "group": config.wandb.group or sweep_group(sweep_dir)}  # the training runs' group
        from ..status import FAILED_JOBS, NOT_OK  # the exit code of `moebench train -m`

        try:  # a sweep over lr or data is a legitimate sweep: one frontier per setup
            summary = aggregate([sweep_dir], sweep_dir, wandb_cfg=wandb_cfg, allow_mixed=True)
        except ParetoError as err:  # every job failed before writing anything: say so, don't crash
            print(f"moebench: pareto: {err}")
            FAILED_JOBS.append(str(sweep_dir))
            return
        print_files(summary)
        # Launchers that run jobs in other processes (joblib, submitit) report failures only on disk. Only
        # this launch's jobs count: another sweep into the same dir has its own (runs in flight: "running").
        launch = status.this_launch()
        FAILED_JOBS.extend(s["run"] for s in summary["skipped"]
                           if s["status"] in NOT_OK and checkpoint.lock_state(Path(s["run"]))[1] == launch)


def main(argv: list[str]) -> int:
    return arguments.call("pareto", run, argv)


def run(args) -> int:
    """``moebench pareto`` on its checked arguments (arguments.pareto_parser)."""
    out = args.out or (Path(args.paths[0]) if len(args.paths) == 1 else Path("pareto"))
    wandb_cfg = report.pareto_wandb_cfg(args.paths, out, mode=args.wandb_mode, project=args.wandb_project,
                                        group=args.wandb_group)
    try:
        summary = aggregate(args.paths, out, wandb_cfg=wandb_cfg, allow_mixed=args.allow_mixed, quality=args.quality,
                            include_init_cost=args.include_init_cost)
    except ParetoError as err:
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2
    print_files(summary)
    return report.main(args.paths, out, wandb_cfg, summary.get("wandb_run_id")) if args.wandb_report else 0
