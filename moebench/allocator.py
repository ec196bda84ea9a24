"""Keep freed CPU memory in the process instead of returning it to the kernel.

glibc serves large blocks (like the stacked gradients of 256 experts: d*h*E
floats, ~150 MB at ViT-Ti width) with fresh mmaps and unmaps them on free, so
every training step page-faults them in again: at 256 experts that doubled the
time of the weight-gradient matmuls (`moebench bench`). Routing every
allocation through the heap and never trimming it makes the steps reuse warm
pages, the same effect PyTorch's CPU tuning guide gets from jemalloc/tcmalloc.
Linux/glibc only; set MOEBENCH_MALLOC_TUNING=0 to opt out.
"""

from __future__ import annotations

import ctypes
import gc
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Apply the glibc settings; returns whether they were applied."""
    if os.environ.get("MOEBENCH_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)


def release_free_memory() -> None:
    """Hand freed heap memory back to the kernel once (between the jobs of a sweep),
    so the next job's peak resident set is its own."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
