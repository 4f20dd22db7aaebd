"""The threads and worker processes an application context owns.

Created on first use and closed by ``AppContext.close``: nothing starts at import time, and two
contexts in one process never share a pool. What runs on them is the caller's business (the
ingest stages hand in the function that starts a process pool).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor


class Workers:
    """Two thread pools (decoding a batch of uploads, writing a batch's files) and one warm set of
    worker processes at a time (a bulk import's decode and embed)."""

    def __init__(self, *, decode_threads: int | None = None, file_threads: int = 4) -> None:
        self._decode_threads = decode_threads or min(4, os.cpu_count() or 1)
        self._file_threads = file_threads
        self._lock = threading.Lock()
        self._decoders: ThreadPoolExecutor | None = None
        self._file_writers: ThreadPoolExecutor | None = None
        self._pools: dict[Hashable, ProcessPoolExecutor] = {}
        self._closed = False

    @property
    def decoders(self) -> ThreadPoolExecutor:
        """Pillow releases the GIL while decoding: a batch decodes on several threads."""
        with self._lock:
            self._check_open()
            if self._decoders is None:
                self._decoders = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="cbir-decode")
            return self._decoders

    @property
    def file_threads(self) -> int:
        return self._file_threads

    @property
    def file_writers(self) -> ThreadPoolExecutor:
        """Creating files is system-call work that releases the GIL."""
        with self._lock:
            self._check_open()
            if self._file_writers is None:
                self._file_writers = ThreadPoolExecutor(self._file_threads, thread_name_prefix="cbir-files")
            return self._file_writers

    def process_pool(self, key: Hashable, start: Callable[[], ProcessPoolExecutor]) -> ProcessPoolExecutor:
        """The warm worker processes for ``key`` (started by ``start()`` once and kept for later
        work; one set at a time: a new key shuts the previous set down). RuntimeError once closed."""
        with self._lock:
            self._check_open()
            pool = self._pools.get(key)
            if pool is not None and _broken(pool):  # a worker died while idle
                pool.shutdown(wait=False, cancel_futures=True)
                del self._pools[key]
                pool = None
            if pool is None:
                for old in self._pools.values():
                    old.shutdown(wait=False, cancel_futures=True)
                self._pools.clear()
                pool = self._pools[key] = start()
            return pool

    def forget_broken(self) -> None:
        """Drop broken process pools; the next ``process_pool`` starts a new set."""
        with self._lock:
            for key, pool in list(self._pools.items()):
                if _broken(pool):
                    pool.shutdown(wait=False, cancel_futures=True)
                    del self._pools[key]

    @property
    def process_pools(self) -> list[ProcessPoolExecutor]:
        with self._lock:
            return list(self._pools.values())

    def close(self) -> None:
        """Stop the worker processes, then the threads (waiting for work in progress)."""
        with self._lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
            threads = [p for p in (self._decoders, self._file_writers) if p is not None]
            self._decoders = self._file_writers = None
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for executor in threads:
            executor.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the application context's workers are closed")


def _broken(pool: ProcessPoolExecutor) -> bool:
    return bool(getattr(pool, "_broken", False))
