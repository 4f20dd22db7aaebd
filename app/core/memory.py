"""This process's memory: what it may use, the decode budget's default share of it, and keeping
large, short-lived buffers from pinning it (glibc's malloc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Per core: decoding is CPU-bound, so more large decodes at once than cores only hold their
# memory longer. A quarter of the memory at most: the models, the index and the rows need the rest.
BUDGET_PER_CORE = 512 * MIB
BUDGET_MEMORY_SHARE = 4
MIN_BUDGET = 64 * MIB


def available_memory() -> int | None:
    """Bytes of memory this process may use: the cgroup's limit where one is set, else the
    machine's; None when neither can be read."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    with suppress(ValueError, OSError, AttributeError):  # no sysconf, or no such name
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(limits) if limits else None


@lru_cache(maxsize=1)
def default_budget() -> int:
    """A quarter of the memory, at most 512 MiB per core, at least 64 MiB."""
    per_cores = BUDGET_PER_CORE * (os.cpu_count() or 1)
    memory = available_memory()
    share = per_cores if memory is None else min(per_cores, memory // BUDGET_MEMORY_SHARE)
    return max(MIN_BUDGET, share)


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
