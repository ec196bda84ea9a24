"""How a run ended: one status vocabulary, its exit codes, and the jobs of this process.

Shared by the training app (which writes ``status`` into ``result.json`` and
sets the exit code) and by ``moebench pareto`` (which reads it back and must
not import the training code).

=========  ==================================================  =========
status     meaning                                             exit code
=========  ==================================================  =========
completed  trained every epoch, evaluated and measured         0
stopped    ``train.time_limit_min`` reached (resumable)        0
preempted  SIGTERM / SIGINT / SIGUSR1 (resumable)              128 + signal number
diverged   a non-finite loss or gradient norm                  3
failed     an error (bad input refused before any work: 2)     1
=========  ==================================================  =========

A sweep (``-m``) exits 0 when every one of its own jobs completed or stopped (runs
of another launch in the same sweep dir do not count), with the signal's code when
a signal stopped it, and 1 otherwise.
"""

from __future__ import annotations

import os
import signal
import time

COMPLETED, STOPPED, PREEMPTED, DIVERGED, FAILED = "completed", "stopped", "preempted", "diverged", "failed"
STATUSES = (COMPLETED, STOPPED, PREEMPTED, DIVERGED, FAILED)
RESUMABLE = (STOPPED, PREEMPTED)  # a checkpoint at the exact position where the run stopped

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # refused before any work: nothing was written
EXIT_DIVERGED = 3

# Statuses a sweep counts as not done well: its command exits non-zero.
# ("unfinished" and "unreadable" are what pareto reports for run dirs without a usable result.json.)
NOT_OK = (FAILED, DIVERGED, PREEMPTED, "unfinished", "unreadable", "running")

# Run dirs of jobs in this process (or, via the Pareto callback, in launcher workers)
# that did not end well: `moebench train`'s exit code.
FAILED_JOBS: list[str] = []
DIVERGED_JOBS: list[str] = []


# A launch: one `moebench train` command. Its id reaches its jobs (launcher workers too) through the
# environment; each job writes it into its run dir's lock file, so a sweep dir shared by several
# launches still tells which runs are whose (the exit code, pareto's "running").
LAUNCH_ENV = "MOEBENCH_LAUNCH"


def start_launch() -> str:
    launch = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_pid{os.getpid()}"
    os.environ[LAUNCH_ENV] = launch
    return launch


def this_launch() -> str | None:
    return os.environ.get(LAUNCH_ENV) or None


def exit_code(status: str, signum: int | None = None) -> int:
    """The exit code of a single run that ended with ``status``."""
    if status == PREEMPTED:
        return 128 + (signum or signal.SIGTERM)
    return {COMPLETED: EXIT_OK, STOPPED: EXIT_OK, DIVERGED: EXIT_DIVERGED}.get(status, EXIT_FAILED)


def note(run_dir: str, status: str) -> None:
    """Remember a job's end for the command's exit code."""
    if status == DIVERGED:
        DIVERGED_JOBS.append(str(run_dir))
    elif status not in (COMPLETED, STOPPED):
        FAILED_JOBS.append(str(run_dir))


def clear() -> None:
    FAILED_JOBS.clear()
    DIVERGED_JOBS.clear()


def command_exit_code(multirun: bool) -> int:
    """0 when every job of the command completed or stopped; else see the module's table."""
    if FAILED_JOBS:
        return EXIT_FAILED
    if DIVERGED_JOBS:
        return EXIT_FAILED if multirun else EXIT_DIVERGED
    return EXIT_OK


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
