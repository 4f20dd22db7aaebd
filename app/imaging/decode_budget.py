"""The process's decode memory budget: every decode reserves its estimated bytes first.

The pixel caps bound one image; nothing bounded how many large images decode at once, and the
admission limit (CBIR_MAX_PENDING_EMBEDS) counts requests, not bytes: eight 40-megapixel 16-bit
PNGs searched at once held 6 GB. Here each upload, search and import decode reserves what
``app.imaging.decode_cost`` estimates from the header and gives it back when its pixels are gone
(decoded, preprocessed, dropped). A request that finds the budget full waits a little, then gets
503 ``overloaded``; an import waits as long as it takes. First come, first served: a large
reservation is not starved by a stream of small ones.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.core.errors import DecodeMemoryFull

log = logging.getLogger(__name__)

# How often a waiting import looks at its stop flag.
_POLL_S = 0.2


class DecodeBudget:
    """A weighted semaphore over bytes with a first-come-first-served queue.

    ``reserved`` never exceeds ``capacity``; ``peak`` is the most reserved at once so far (what
    tests and the benchmark read). A reservation larger than the capacity is clamped to it, so it
    runs alone rather than never.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a decode budget needs at least one byte, not {capacity}")
        self.capacity = capacity
        self._reserved = 0
        self._peak = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def peak(self) -> int:
        return self._peak

    @property
    def waiting(self) -> int:
        """How many acquisitions are queued now (tests poll it rather than sleep)."""
        with self._changed:
            return len(self._queue)

    def acquire(
        self, nbytes: int, *, timeout: float | None, stopped: Callable[[], bool] | None = None
    ) -> int | None:
        """Reserve ``nbytes`` (clamped to the capacity) and return the bytes reserved, for
        ``release``; None when ``timeout`` seconds passed or ``stopped()`` turned true first."""
        nbytes = min(max(0, nbytes), self.capacity)
        if nbytes == 0:
            return 0
        ticket = object()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._reserved + nbytes > self.capacity:
                    if stopped is not None and stopped():
                        return None
                    wait = _POLL_S if stopped is not None else None
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return None
                        wait = left if wait is None else min(wait, left)
                    self._changed.wait(wait)
                self._reserved += nbytes
                self._peak = max(self._peak, self._reserved)
                return nbytes
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in the queue may fit now

    def release(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._changed:
            self._reserved -= nbytes
            self._changed.notify_all()

    @contextmanager
    def reserve(self, nbytes: int, *, wait_s: float) -> Iterator[int]:
        """Hold ``nbytes`` for the block; DecodeMemoryFull (503 overloaded) after ``wait_s``."""
        got = self.acquire(nbytes, timeout=wait_s)
        if got is None:
            raise DecodeMemoryFull(
                f"decoding this image needs about {nbytes} bytes and the decode memory budget "
                f"({self.capacity} bytes, CBIR_DECODE_MEMORY_BUDGET_BYTES) stayed in use by other "
                f"images for {wait_s:g} s; retry shortly",
                retry_after=max(1, math.ceil(wait_s)),
            )
        try:
            yield got
        finally:
            self.release(got)
