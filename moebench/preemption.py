"""Signals that ask a run to stop at the end of its current step, checkpointed there.

SLURM sends SIGUSR1 (with ``--signal``) or SIGTERM before it kills a job at its
time limit, schedulers and ``kill`` send SIGTERM, Ctrl-C sends SIGINT. Stopping
between steps, rather than where the signal lands, is what lets a checkpoint
hold an exact position. A second SIGINT stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class StopRequest:
    """While entered: the handled signals set ``signum`` instead of killing the process."""

    def __init__(self, names=DEFAULT_SIGNALS):
        self.signals = [getattr(signal, str(name)) for name in names]
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a launcher running jobs in threads): signals stay as they were
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step
        self.signum = signum
