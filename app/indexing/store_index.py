"""A collection's space in a vector store (``index.store``), seen by searches as its index.

``StoreIndex`` answers what the search, sampling and catalog code asks of a ``VectorIndex``
(dimension, size, ids, search with allowed ids and knobs, status fields), so that those callers do
not know whether the vectors live in FAISS in this process or in Milvus. Searches may also take a
``Where`` (labels, created range) that the store evaluates itself.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from index import SearchKnobs
from index.kinds import default_knobs
from index.store import Reconciled, SpaceMissing, VectorStore, Where, empty_hits

log = logging.getLogger(__name__)
T = TypeVar("T")

# A space of this collection's name that its alias does not name, built longer ago than this, was
# left by a build that died: the next build drops it. A younger one may be another replica's build.
ORPHAN_AGE_S = 3600.0

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


# -- building a space beside the one that serves ------------------------------------------------
# A collection's space name is an alias (``VectorStore.point``) of a space named after it and the
# time it was built (``{name}_r{microseconds:x}``). A rebuild fills a new space while the old one
# serves, then switches the alias at once and drops the old space: searches never meet a gap.
def fresh_space(space: str) -> str:
    return f"{space}_r{time.time_ns() // 1000:x}"


def built_at_us(space: str, name: str) -> int | None:
    """When ``name`` was built as a space of ``space`` (microseconds since the epoch), or None."""
    match = re.fullmatch(re.escape(space) + r"_r([0-9a-f]+)", name)
    return int(match[1], 16) if match else None


def create_serving(store: VectorStore, space: str, *, dim: int, kind: str) -> None:
    """``space`` created empty: an alias of a new space."""
    new = fresh_space(space)
    store.create(new, dim=dim, kind=kind)
    try:
        store.point(space, new)
    except BaseException:
        store.drop(new)
        raise


def build_beside(
    store: VectorStore, space: str, *, dim: int, kind: str, fill: Callable[[str], Reconciled]
) -> Reconciled:
    """A new space of ``dim`` and ``kind`` filled by ``fill(name)`` while ``space`` serves as it
    was, then made ``space`` at once; the space it replaces is dropped. A ``space`` that is no
    alias (made before aliases) is dropped just before the switch: its one gap."""
    new = fresh_space(space)
    store.create(new, dim=dim, kind=kind)
    try:
        done = fill(new)
        old = store.target(space)
        if old is None and store.exists(space):
            store.drop(space)
        store.point(space, new)
    except BaseException:
        store.drop(new)
        raise
    if old is not None and old != new:
        store.drop(old)
    return done


def unused_spaces(store: VectorStore, space: str, names: list[str]) -> list[str]:
    """Of ``names`` (a collection's spaces), those nothing serves: other embedder versions' spaces
    and this one's that its alias does not name, once older than ``ORPHAN_AGE_S``."""
    serving = store.target(space)
    now_us = time.time_ns() // 1000
    unused = []
    for name in names:
        built = built_at_us(space, name)
        if name in (space, serving) or (built is not None and now_us - built < ORPHAN_AGE_S * 1e6):
            continue
        unused.append(name)
    return unused
