"""`moebench train`: the Hydra app; each job builds, trains, evaluates and measures one model.

Nothing but the CLI imports this module. One call of ``run_job`` is one run:
it leaves ``result.json``, ``metrics.jsonl``, checkpoints and a W&B run in its
run dir, whatever happens (status completed, stopped, preempted, diverged or
failed: status.py), once it holds the dir's lock (a job refused there because
another run holds it writes nothing). The run itself is loop.py's
(``train_and_measure``: ``build`` -> ``fit`` -> ``measure`` around one
``RunState``), config -> objects build.py's, the record run_records.py's.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import checkpoint, distributed, faults, invocation, preflight, probe, resolvers, search, status  # probe: eval.probe after training
from .build import build_model, check_fits, validate  # noqa: F401 (build_model: tests/test_distributed.py)
from .preflight import conf_dir
from .checkpoint import check_resume_config
from .data import DataError
from .errors import RecordError, UserError
from .preemption import DEFAULT_SIGNALS, StopRequest
from .tracking import run_name, sweep_group
from .loop import RunState, train_and_measure
from .run_records import leave_record

log = logging.getLogger("moebench")

FAILED_JOBS = status.FAILED_JOBS  # run dirs of jobs that did not end well (the CLI's exit code)
COMMAND: preflight.Command | None = None  # this process's checked command line (main)
STARTUP_STOP = StopRequest()  # signals before and between jobs (main): remembered for the next job


def previous_result(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Make re-running a cut-off sweep (same sweep dir) pick up where it stopped.

    A run dir that already holds a completed run of this config is not trained
    again (its result is returned); one that holds a checkpoint of an unfinished
    run (stopped, preempted, killed...) is resumed from it.
    """
    if cfg.resume:
        return None
    result_file = run_dir / "result.json"
    last = run_dir / "last.pt"
    if result_file.is_file():
        try:
            previous = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("status") == status.COMPLETED:
            check_resume_config(previous.get("config", {}), cfg, result_file)
            if previous.get("epochs_completed", 0) >= cfg.train.epochs or not last.is_file():
                return previous
    if last.is_file():
        log.info("%s holds an unfinished run: resuming it", run_dir)
        cfg.resume = str(run_dir)
    return None


def wandb_settings(cfg: DictConfig) -> dict:
    """W&B run identity: group = the sweep (dated) under -m, name = the user's overrides."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = cfg.wandb.group or (sweep_group(hc.sweep.dir) if multirun else None)
    name = cfg.wandb.name or run_name(list(hc.overrides.task), hc.job.config.override_dirname.exclude_keys)
    tags = [cfg.router.name, cfg.data.name, *cfg.wandb.tags]
    return {"mode": cfg.wandb.mode, "project": cfg.wandb.project, "entity": cfg.wandb.entity,
            "group": group, "name": name, "tags": tags, "job_type": "train"}


def run_job(cfg: DictConfig) -> dict:
    """One Hydra job. User errors end it with one line and status "failed", divergence with
    status "diverged"; under -m the sweep goes on with the next job. A signal ends it with
    status "preempted" after a checkpoint, and ends the command (a sweep too)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    ranks = distributed.current()
    state: dict = {"run_dir": run_dir}
    outcome, error, result, skipped = status.FAILED, None, None, False
    stopper = StopRequest(cfg.train.get("preempt_signals") or DEFAULT_SIGNALS)
    stopper.signum = STARTUP_STOP.signum  # a signal while the command started: stop after the first step
    held = False  # this process holds the run dir's lock: only then may it write there
    try:
        with stopper:
            if ranks.is_main:  # first: a job refused here (another run holds the dir) writes nothing into it
                try:
                    checkpoint.lock_run_dir(run_dir)
                except UserError:
                    release_log_file(run_dir)  # Hydra's train.log handler: not ours to write to
                    raise
            held = True
            validate(cfg)  # types and ranges (schema.py), then the rules between keys
            probe.check_config(cfg)
            previous = previous_result(cfg, run_dir)
            if previous is not None:  # its records are already on disk
                log.info("%s already holds this completed run: skipping it", run_dir)
                skipped, outcome = True, status.COMPLETED
                return previous
            result = train_and_measure(cfg, run_dir, wandb_settings(cfg), state, stopper)
            probe.after_training(cfg, result, state["run_dir"])  # eval.probe: few-shot probes into the result
            search.record(result, cfg, hc)  # under hydra/sweeper=optuna: what the study searched and saw
            outcome = result["status"]
            return result
    except (UserError, DataError, OSError) as err:  # OSError: a full disk, a dir made read-only...
        error = str(err) if not isinstance(err, OSError) else f"{err.filename or state['run_dir']}: {err.strerror}"
        if ranks.is_main:
            print(f"moebench: error: {error}", file=sys.stderr, flush=True)  # one plain line, never wrapped
        if not multirun:
            bad_input = not isinstance(err, (OSError, RecordError))
            raise SystemExit(status.EXIT_BAD_INPUT if bad_input else status.EXIT_FAILED) from None
        return {"status": status.FAILED, "error": error}
    except KeyboardInterrupt:  # a second Ctrl-C: out now, with the last checkpoint written
        outcome, error = status.PREEMPTED, "KeyboardInterrupt (SIGINT twice): stopped mid-step"
        state["signum"] = signal.SIGINT
        return {}
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        if ranks.enabled:  # one line per failing rank, and no waiting for the others (see main)
            if distributed.is_peer_failure(err):
                error = f"another rank failed ({error.splitlines()[0]})"
            else:
                print(f"moebench: error: rank {ranks.rank}: {error.splitlines()[0]}", file=sys.stderr, flush=True)
            raise SystemExit(status.EXIT_FAILED) from None
        if not multirun:
            raise  # a bug: the traceback helps
        log.exception("job failed: %s", error)  # keep the traceback in the log, but let a sweep go on
        return {"status": status.FAILED, "error": error}
    finally:
        run = state.get("run")
        if not skipped:
            status.note(str(state["run_dir"]), outcome)
            if ranks.is_main and held:  # a job that does not hold the dir (another run does) leaves no record
                leave_record(cfg, state, result, outcome, error)
        if ranks.is_main and held:
            checkpoint.unlock_run_dir(state["run_dir"])
        if outcome == status.PREEMPTED:
            signum = (run.signum if run is not None and run.signum else None) or state.get("signum") or signal.SIGTERM
            if ranks.is_main:
                announce_stop(state["run_dir"], signum, run, multirun)
            raise SystemExit(status.exit_code(status.PREEMPTED, signum))  # the sweep stops too


def release_log_file(run_dir: Path) -> None:
    """Close the log handlers Hydra opened on files in ``run_dir`` (its ``train.log``): a job refused
    there must not log into another run's file (the next job's launch line would go there)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == Path(os.path.abspath(run_dir)):
            root.removeHandler(handler)
            handler.close()


def announce_stop(run_dir: Path, signum: int, run: "RunState | None", multirun: bool) -> None:
    """Where the preempted run is and the exact command that continues it (stderr: logs of batch jobs)."""
    where = f"step {run.step} (epoch {run.epoch + 1}, batch {run.batch}/{run.steps_per_epoch})" if run else "startup"
    print(f"moebench: {status.signal_name(signum)}: preempted at {where}; run dir: {run_dir}", file=sys.stderr)
    print(f"moebench: resume with: {resume_command(run_dir, multirun)}", file=sys.stderr, flush=True)


def resume_command(run_dir: Path, multirun: bool) -> str:
    if COMMAND is not None:
        return COMMAND.resume_command(run_dir)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    return " ".join([invocation.command(), shlex.join(["train", *overrides, f"resume={run_dir}"])])


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> list[float] | None:
    result = run_job(cfg)
    hc = HydraConfig.get()
    if search.in_study(hc):  # the values the study records; a run that did not complete: a failed trial
        return search.objective_values(result, list(cfg.search.objectives), hc.runtime.output_dir)
    return None


def main(args: list[str], checked: preflight.Checked | None = None) -> int:
    """Run the Hydra app with ``args`` as its command line; returns the exit code (status.py).
    ``checked``: the CLI's checks of ``args`` from the config alone, made before torch was imported."""
    global COMMAND
    resolvers.register()  # conf/train.yaml's ${moebench_*:} (process-wide, so not on import)
    status.clear()
    status.start_launch()  # this command's id: its jobs write it into their lock files
    STARTUP_STOP.signum = None
    extra = distributed.setup()  # under torchrun: join the ranks first
    ranks = distributed.current()
    code = status.EXIT_OK
    try:
        refused = None
        try:
            search.prepare_preset(args)  # hydra/sweeper=optuna: moebench's preset (conf/hydra/sweeper/optuna.yaml)
            COMMAND = preflight.prepare(args, conf_dir(), validate, check_fits, checked)
            if ranks.is_main:
                for warning in COMMAND.warnings:
                    print(f"moebench: warning: {warning}", file=sys.stderr, flush=True)
            if COMMAND.run_dir is not None and ranks.is_main:
                checkpoint.lock_run_dir(COMMAND.run_dir)
        except UserError as err:  # nothing was written
            refused = str(err)
        refused = distributed.refusal(refused, ranks)  # under torchrun: one answer for all ranks
        if refused is not None:
            if ranks.is_main:
                faults.hit("refuse")
                print(f"moebench: error: {refused}", file=sys.stderr, flush=True)
            distributed.barrier(ranks)  # the line is out before any rank exits (torchrun stops the rest)
            code = status.EXIT_BAD_INPUT
            return code
        sys.argv = ["moebench train", *COMMAND.args, *extra]
        try:
            with STARTUP_STOP:
                _hydra_main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            return code
        code = status.command_exit_code(COMMAND.multirun)
        if STARTUP_STOP.signum:  # e.g. Ctrl-C while launcher workers ran the jobs: they stopped, so did we
            code = status.exit_code(status.PREEMPTED, STARTUP_STOP.signum)
        return code
    finally:
        distributed.teardown(ok=code == status.EXIT_OK)
        if code != status.EXIT_OK and ranks.enabled:
            distributed.abandon(code)  # the other ranks may be anywhere: no barrier, no waiting
        if code > 128:  # preempted, records written: the scheduler's grace period is not for interpreter teardown
            distributed.abandon(code)
