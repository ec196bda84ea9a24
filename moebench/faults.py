"""Fault injection for the reliability tests: ``MOEBENCH_FAULT`` makes a run fail on purpose.

``MOEBENCH_FAULT="ACTION:POINT:N[:RANK]"`` (several separated by ``;``) fires
ACTION the N-th time the code passes POINT (on torchrun rank RANK only, if given):

- points: ``step`` (after each training step's backward), ``refuse`` (rank 0 about to
  print why the command line is refused), ``write:FILE`` (an
  atomic write of FILE, e.g. ``write:last.pt``, after the data went to the temp
  file and before the rename);
- actions: ``sigkill`` (the process dies at once, as with ``kill -9``),
  ``raise`` (a RuntimeError), ``enospc`` (an OSError "No space left on device"),
  ``nan`` (``hit`` returns True: the caller poisons its loss), ``slow`` (from the
  N-th pass on, every pass sleeps 0.1 s: time for a test to send a signal),
  ``pause`` (the N-th pass sleeps 3 s: another process gets there first).

Unset (always, outside tests) every ``hit`` is a dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

_hits: Counter = Counter()


def _plan() -> list[tuple[str, str, int, int | None]]:
    plan = []
    for item in filter(None, (part.strip() for part in os.environ.get("MOEBENCH_FAULT", "").split(";"))):
        action, *fields = item.split(":")
        if fields[0] == "write":  # the point itself holds a colon: write:FILE
            fields = [f"write:{fields[1]}", *fields[2:]]
        point, n, *rank = fields
        plan.append((action, point, int(n), int(rank[0]) if rank else None))
    return plan


def hit(point: str) -> bool:
    """Pass POINT; True when a ``nan`` fault fires here."""
    if "MOEBENCH_FAULT" not in os.environ:
        return False
    _hits[point] += 1
    rank = int(os.environ.get("RANK", 0))
    for action, where, n, only_rank in _plan():
        if where != point or (only_rank is not None and only_rank != rank):
            continue
        if action == "slow" and _hits[point] >= n:
            time.sleep(0.1)
        if _hits[point] != n:
            continue
        if action == "pause":
            time.sleep(3.0)
        if action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "raise":
            raise RuntimeError(f"injected fault at {point} #{n}")
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if action == "nan":
            return True
    return False
