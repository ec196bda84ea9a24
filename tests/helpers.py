"""Test helpers that need no pytest fixture: two ranks of torch.distributed in spawned processes.

Import them with ``from helpers import ...`` (pytest puts tests/ on the path), as ``moe_reference``. This
module imports torch but neither Hydra nor moebench: the spawned processes import it again each.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  before any group exists: see moebench/distributed.py
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


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux; [] elsewhere). They live exactly as long as a gloo
    process group does: one still running at interpreter shutdown can abort the process (SIGABRT)."""
    names = []
    for task in Path("/proc/self/task").glob("*") if os.path.isdir("/proc/self/task") else []:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return names


def assert_group_gone(timeout_s: float = 10.0) -> None:
    """Fail unless every gloo thread of this process ends within ``timeout_s`` after ``destroy_process_group``:
    one that lives on means something still holds the group."""
    gc.collect()
    deadline = time.monotonic() + timeout_s
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not gloo_threads(), f"the process group outlived destroy_process_group: threads {gloo_threads()} remain"


def _in_a_group(rank: int, body, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        body(rank)
        gc.collect()  # (a DDP reducer in a reference cycle holds the group)
    finally:
        dist.destroy_process_group()
    assert_group_gone()


def _rank_main(rank: int, body, init_file: str, errors, join_group: bool) -> None:
    try:
        if join_group:
            _in_a_group(rank, body, init_file)
        else:  # the body makes and ends its group itself
            body(rank)
    except Exception:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_on_two_ranks(body, tmp_path: Path, join_group: bool = True) -> None:
    """``body(rank)`` in two spawned processes that share one gloo process group (rendezvous through a file in
    ``tmp_path``); the test fails with every failing rank's traceback. ``body`` must be a module-level function
    (spawn pickles it by name) and sets up in each process what it needs (the default dtype, threads, seeds).
    The test also fails if the group outlives ``destroy_process_group`` after the body (``assert_group_gone``).
    ``join_group=False``: the body joins and leaves a group of its own (the harness only reports its failures)."""
    errors = mp.get_context("spawn").SimpleQueue()
    failure = None
    try:
        mp.spawn(_rank_main, args=(body, str(tmp_path / "init"), errors, join_group), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException as err:  # the queue has the rank's whole traceback; this, the rest
        failure = str(err)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages and failure is None, "\n".join(messages) or failure
