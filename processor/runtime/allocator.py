"""glibc's allocator, set for a process that handles messages of up to 10 MB.

By default glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB) and
gives threads that contend for the heap arenas of their own. After a few 10 MB messages, freed
memory then stays in fragmented arenas instead of going back to the system, and a processor's peak
RSS nearly doubles (bench/hostile.py, docs/benchmarks.md). A fixed 128 KiB threshold hands every
large block back when it is freed, and two arenas are plenty for a process whose Python threads the
GIL serialises anyway. MALLOC_MMAP_THRESHOLD_ or MALLOC_ARENA_MAX in the environment win; on a C
library other than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import os

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024
ARENA_MAX = 2


def tune() -> bool:
    """Apply the settings above; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, ARENA_MAX)
    return True
