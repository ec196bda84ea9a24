"""Test helpers that need no pytest fixture: two ranks of torch.distributed in spawned processes.

Import them with ``from helpers import ...`` (pytest puts tests/ on the path), as ``moe_reference``. This
module imports torch but neither Hydra nor moebench: the spawned processes import it again each.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


class CaseFailed(Exception):
    """Raised from a rank's failure inside ``case(name)``: the report then says which case it was."""


@contextmanager
def case(name: str):
    """Name the case of the block in a two-rank failure report (the rank's traceback shows it)."""
    try:
        yield
    except Exception as err:
        raise CaseFailed(name) from err


def _rank_main(rank: int, body, init_file: str, errors) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        body(rank)
    except Exception:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(body, tmp_path: Path) -> None:
    """``body(rank)`` in two spawned processes that share one gloo process group (rendezvous through a file in
    ``tmp_path``); the test fails with every failing rank's traceback. ``body`` must be a module-level function
    (spawn pickles it by name) and sets up in each process what it needs (the default dtype, threads, seeds)."""
    errors = mp.get_context("spawn").SimpleQueue()
    failure = None
    try:
        mp.spawn(_rank_main, args=(body, str(tmp_path / "init"), errors), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException as err:  # the queue has the rank's whole traceback; this, the rest
        failure = str(err)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages and failure is None, "\n".join(messages) or failure
