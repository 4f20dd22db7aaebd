"""A collection's space in a vector store (``index.store``), seen by searches as its index.

``StoreIndex`` answers what the search, sampling and catalog code asks of a ``VectorIndex``
(dimension, size, ids, search with allowed ids and knobs, status fields), so that those callers do
not know whether the vectors live in FAISS in this process or in Milvus. Searches may also take a
``Where`` (labels, created range) that the store evaluates itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from index import SearchKnobs
from index.kinds import default_knobs
from index.store import SpaceMissing, VectorStore, Where, empty_hits

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a replica trusts the count it read (writes by this process refresh it at once): a
# Milvus count is a query of its own, not worth paying on every search.
COUNT_TTL_S = 2.0


class StoreIndex:
    """One space of ``store``: ``dim`` 0 and nothing stored until the first vectors arrive (the
    space is created then, with their dimension).

    ``reopen`` (set by the manager) answers the space as it is once reconciled with the database:
    when another process dropped the space, a read re-opens it through it once and answers from
    there (empty when it still has no space), rather than failing."""

    def __init__(
        self,
        store: VectorStore,
        space: str,
        *,
        dim: int,
        kind: str,
        meta: dict[str, Any],
        reopen: Callable[[], StoreIndex | None] | None = None,
    ) -> None:
        self.store = store
        self.reopen = reopen
        self.space = space
        self._dim = dim
        self._kind = kind
        self._meta = dict(meta)
        self._knobs = default_knobs(kind)
        self._lock = threading.Lock()
        self._count: tuple[float, int] | None = None

    # -- what VectorIndex callers read ------------------------------------------------------
    @property
    def created(self) -> bool:
        return self._dim > 0

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def factory(self) -> str:
        return f"IDMap2,{self._kind}"

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def update_meta(self, **values: Any) -> None:
        with self._lock:
            self._meta.update(values)

    @property
    def ntotal(self) -> int:
        if not self.created:
            return 0
        with self._lock:
            cached = self._count
        if cached is not None and time.monotonic() - cached[0] < COUNT_TTL_S:
            return cached[1]
        count = self._read(lambda index: index.store.count(index.space), empty=0)
        with self._lock:
            self._count = (time.monotonic(), count)
        return count

    def changed(self) -> None:
        """Forget the cached count (after a write)."""
        with self._lock:
            self._count = None

    @property
    def tombstones(self) -> int:
        return 0  # the store compacts deletions itself

    @property
    def high_water_mark(self) -> int:
        ids = self.ids()
        return int(ids[-1]) if ids.size else -1

    def memory_bytes(self) -> int:
        return 0  # held by the store, not by this process

    def ids(self) -> np.ndarray:
        """Every stored id, (n,) int64 ascending."""
        if not self.created:
            return np.empty(0, np.int64)
        return self._read(
            lambda index: index.store.list_ids(index.space),
            empty=np.empty(0, np.int64),
        )

    def _read(self, call: Callable[[StoreIndex], T], *, empty: T) -> T:
        """``call(self)``; when the space is gone, ``call`` of the index ``reopen`` gives (once), or
        ``empty`` when there is none, it has no space, or its space is gone again."""
        try:
            return call(self)
        except SpaceMissing:
            log.warning("vector store space %s is gone (dropped elsewhere?); re-opening it", self.space)
        again = self.reopen() if self.reopen is not None else None
        if again is None or again is self or not again.created:
            return empty
        try:
            return call(again)
        except SpaceMissing:
            return empty

    def search_knobs(self) -> SearchKnobs:
        return self._knobs

    def set_search_knobs(self, knobs: SearchKnobs) -> None:
        """The collection's search parameters (every search passes them to the store)."""
        self._knobs = knobs

    def search(
        self,
        vectors: Any,
        k: int,
        *,
        allowed_ids: Any | None = None,
        knobs: SearchKnobs | None = None,
        where: Where | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best ids per query row (n, d) float32 unit rows: ((n, k) float32 scores,
        (n, k) int64 ids), empty slots -inf and -1. ``knobs`` (efSearch, nprobe) override the
        collection's for this search; the store gets them merged (Milvus: its search params)."""
        empty = empty_hits(np.asarray(vectors).shape[0], int(k))
        if not self.created:
            return empty
        return self._read(
            lambda index: index.store.search(
                index.space,
                vectors,
                int(k),
                where=where,
                allowed_ids=allowed_ids,
                knobs=index.search_knobs().merged(knobs),
            ),
            empty=empty,
        )

    def __repr__(self) -> str:
        return f"StoreIndex({self.store.backend}:{self.space}, {self._kind}, dim={self._dim})"
