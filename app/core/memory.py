"""Keep large, short-lived buffers from pinning memory (glibc's malloc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024
ARENA_MAX = 2

_done = False


def tune_malloc() -> bool:
    """Serve every allocation over 256 KiB from its own mapping, returned to the system when freed,
    and cap malloc's per-thread arenas at two.

    An import decodes photos of several megabytes on several threads. By default glibc raises its
    mmap threshold to the size of the largest block freed so far (up to 32 MiB), after which such
    buffers come from per-thread heaps that keep their peak: a 1 GB import of 2 MP JPEGs then
    ended a gigabyte above where it started. A fixed threshold keeps the resident size flat. Does
    nothing off glibc; returns whether it applied.
    """
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
    _done = ok
    if not ok:
        log.info("mallopt refused the memory settings; using malloc's defaults")
    return ok
