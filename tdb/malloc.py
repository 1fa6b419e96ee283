"""Keep the capture's freed memory in the process instead of giving it back to the system.

A node table allocates and frees grids of (query, key) pairs per layer: at 512 tokens and 12
heads, 12.6 MB each, a few per layer. glibc serves allocations above its mmap threshold with
fresh pages from the kernel and returns them when freed, so every such grid costs page faults
(about a third of `tdb nodes`' system time at 512 tokens, measured in docs/performance.md).
Raising the threshold to glibc's maximum (32 MiB) and the heap's trim threshold keeps those
pages for the next grid. Peak memory does not grow (the same blocks are reused); what the
process holds between its peaks stays mapped, as PyTorch's own GPU allocator does.

Only on Linux with glibc, and only where the user has not tuned malloc (`MALLOC_*` in the
environment) or turned this off (`TDB_MALLOC=default`).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # an int: about 2 GiB free at the heap's top before trimming


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; True if it was done."""
    if sys.platform != "linux" or os.environ.get("TDB_MALLOC") == "default":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
