"""Checkpoints of the served indexes: which hold writes their file lacks, a saver thread that writes
them at most every ``save_interval`` seconds (less often when saving takes long), and why the last
checkpoint of a collection failed. A failed checkpoint costs a longer replay on the next start only:
the database holds every row."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.core.faults import crash_point
from index import VectorIndex

log = logging.getLogger(__name__)


class Checkpoints:
    """The dirty set and the saving of one manager's indexes; ``lock`` is the manager's, which
    guards ``index_of`` (the served index of a collection id, None when there is none)."""

    def __init__(
        self,
        *,
        path_for: Callable[[int], Path],
        index_of: Callable[[int], VectorIndex | None],
        lock: threading.RLock,
        stop: threading.Event,
        save_interval: float,
        read_only: bool,
    ) -> None:
        self._path_for = path_for
        self._index_of = index_of
        self._lock = lock
        self._stop = stop
        self.save_interval = save_interval
        self.read_only = read_only
        self._dirty: set[int] = set()
        self._save_cost: dict[int, float] = {}
        self._last_save: dict[int, float] = {}
        # Collections whose last checkpoint failed (a full disk, a file size limit): health shows
        # "checkpoint_failed" until one succeeds. The database still holds every row.
        self._errors: dict[int, str] = {}
        self._saver: threading.Thread | None = None

    def mark(self, collection_id: int) -> None:
        """The collection's index holds writes its file lacks. Called under the lock."""
        self._dirty.add(collection_id)

    def clean(self, collection_id: int) -> None:
        """The collection's index is about to be saved, or gone. Called under the lock."""
        self._dirty.discard(collection_id)

    @property
    def saving(self) -> bool:
        return self._saver is not None

    def start_saver(self) -> None:
        self._saver = threading.Thread(target=self._save_loop, name="index-saver", daemon=True)
        self._saver.start()

    def stop_saver(self) -> None:
        """Wait for the saver to notice ``stop`` (set by the caller)."""
        if self._saver is not None:
            self._saver.join(timeout=10)
            self._saver = None

    def _save_loop(self) -> None:
        while not self._stop.wait(self.save_interval):
            try:
                self.flush_all()
            except Exception:  # a failed checkpoint must not kill the saver; the DB still has it all
                log.exception("index checkpoint failed")

    def flush(self, collection_id: int, *, force: bool = True) -> None:
        with self._lock:
            if collection_id not in self._dirty:
                return
            if not force:
                # Saving a big index takes seconds: never spend more than a fifth of the time on it.
                wait = max(self.save_interval, 5 * self._save_cost.get(collection_id, 0.0))
                if time.monotonic() - self._last_save.get(collection_id, 0.0) < wait:
                    return
            self._dirty.discard(collection_id)
            index = self._index_of(collection_id)
        if index is not None:
            self.save(collection_id, index)

    def flush_all(self, *, force: bool = False) -> None:
        with self._lock:
            dirty = list(self._dirty)
        for collection_id in dirty:
            self.flush(collection_id, force=force)

    def save(self, collection_id: int, index: VectorIndex) -> bool:
        """Save, or log why not and keep the index dirty: a failed checkpoint (ENOSPC, EFBIG) leaves
        the previous file whole (``save`` renames a complete temporary file into place) and costs
        nothing but a longer replay on the next start, so serving and writes go on."""
        if self.read_only:
            return False
        started = time.perf_counter()
        try:
            self._write(collection_id, index)
        except Exception as exc:
            with self._lock:
                self._dirty.add(collection_id)
                self._errors[collection_id] = f"{type(exc).__name__}: {exc}"
            # Try again after 10 s rather than every save interval: the disk will not empty itself.
            self._save_cost[collection_id] = max(self._save_cost.get(collection_id, 0.0), 2.0)
            self._last_save[collection_id] = time.monotonic()
            log.error("index checkpoint of collection %d failed (old file kept): %s", collection_id, exc)
            return False
        self._save_cost[collection_id] = time.perf_counter() - started
        self._last_save[collection_id] = time.monotonic()
        if self._errors.pop(collection_id, None) is not None:
            log.warning("index checkpoint of collection %d succeeded again", collection_id)
        return True

    def _write(self, collection_id: int, index: VectorIndex) -> None:
        """Write a checkpoint. Its high-water mark is in the file's own header, renamed into place
        with the vectors, so the two never disagree: the crash point ``after_replace_before_hwm``
        is the rename not yet made durable (directory fsync), ``after_hwm`` the save complete."""
        index.save(self._path_for(collection_id), on_stage=_crash_stage)
        crash_point("after_hwm")

    def errors(self) -> dict[int, str]:
        """Collection id -> why its last checkpoint failed (empty when all succeeded)."""
        with self._lock:
            return dict(self._errors)


def _crash_stage(stage: str) -> None:
    crash_point("during_write_index" if stage == "half_written" else "after_replace_before_hwm")
