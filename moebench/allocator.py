"""Keep freed CPU memory in the process instead of returning it to the kernel.

glibc serves large blocks (like the stacked gradients of 256 experts: d*h*E
floats, ~150 MB at ViT-Ti width) with fresh mmaps and unmaps them on free, so
every training step page-faults them in again: at 256 experts that doubled the
time of the weight-gradient matmuls (`moebench bench`). Routing every
allocation through the heap and never trimming it makes the steps reuse warm
pages, the same effect PyTorch's CPU tuning guide gets from jemalloc/tcmalloc.

Applied once per process by ``tune_cpu_allocator()``: the ``moebench`` command
calls it before any subcommand; a library user calls it (``moebench.moe``
re-exports it) to get the same speed. Linux/glibc only; importing changes
nothing. The cost: memory freed by the process stays reserved by it (its
resident size keeps its high-water mark) until ``release_free_memory()``. Set MOEBENCH_MALLOC_TUNING=0 in the
environment to make the call a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: bool | None = None


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_cpu_allocator() -> bool:
    """Apply the glibc settings (once per process); returns whether they are in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOEBENCH_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1
    _applied = bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)
    return _applied


def allocator_tuning_applied() -> bool:
    """Whether this process runs with the tuning (False before ``tune_cpu_allocator``)."""
    return bool(_applied)


def release_free_memory() -> None:
    """Hand freed heap memory back to the kernel once (between the jobs of a sweep),
    so the next job's peak resident set is its own."""
    gc.collect()
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
