"""A collection's index built afresh from the database: the kind chosen, FAISS's refusal answered by
exact search, recall measured with held-out queries (``index.recall``); and the record of a build
that runs in the background while writes arrive."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from app.data.db import Database
from app.data.records import CollectionRecord
from app.data.vector_rows import load_vectors
from app.indexing.problems import (
    BAD_INDEX_FACTORY,
    FactoryChecks,
    IndexProblems,
    checked_factory,
    checked_knobs,
    factory_problem,
)
from app.indexing.store_index import StoreIndex
from index import SearchKnobs, VectorIndex
from index.factories import normalise_factory
from index.kinds import AUTO, auto_factory, build_index, servable_factory
from index.recall import recall_at_k

log = logging.getLogger(__name__)

RECALL_QUERIES = 200


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def knobs_of(collection: CollectionRecord) -> SearchKnobs:
    """The collection's valid stored search parameters (index_problems.checked_knobs)."""
    return checked_knobs(collection)[0]


def target_factory(collection: CollectionRecord, *, n: int, dim: int, checks: FactoryChecks) -> str:
    """The factory the collection's index should have now (``auto`` resolved by size), normalised;
    exact search for a stored factory cbir does not build (a restored backup's ``HNSW0``)."""
    requested, _ = checked_factory(collection, dim=dim if n else None, checks=checks)
    return servable_factory(normalise_factory(auto_factory(n, dim) if requested == AUTO else requested), n)


class Stopped(Exception):
    """The manager is stopping: a background build gives up between its phases."""


@dataclass
class Build:
    """A background build: the writes that arrive while it reads the database are replayed on it."""

    version: str
    factory: str | None  # None: the collection's own (auto resolved by size when it runs)
    reason: str
    collection: str = ""
    target: str = ""  # what GET .../index shows: ``factory``, else the collection's kind at the start
    queued: str | None = None  # a kind set meanwhile: why the next build follows this one
    started_at: str = field(default_factory=now)
    pending: list[tuple[str, np.ndarray, np.ndarray | None]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Fresh:
    """A new index, how long it took, and why it is exact search when the kind asked for failed."""

    index: VectorIndex
    seconds: float
    error: str | None = None


def fresh_index(
    db: Database,
    collection: CollectionRecord,
    *,
    factory: str | None,
    problems: IndexProblems,
    stopping: threading.Event,
) -> Fresh:
    """A new index of the collection's vectors as the database holds them now, recall measured;
    ``factory`` None builds the collection's own kind. Raises ``Stopped`` once ``stopping`` is set."""
    version = collection.embedder_version
    assert version is not None
    started = time.perf_counter()
    refused: dict[int, str] = {}
    vectors, ids = load_vectors(db, collection_id=collection.id, embedder_version=version, refused=refused)
    problems.refused(collection, refused)
    dim = int(vectors.shape[1]) if len(ids) else 1
    problems.settings(collection, dim=dim if len(ids) else None)
    chosen = (
        normalise_factory(factory)
        if factory
        else target_factory(collection, n=len(ids), dim=dim, checks=problems.checks)
    )
    if stopping.is_set():
        raise Stopped
    meta = {"collection": collection.name, "embedder_version": version}
    error = None
    try:
        index = build_index(vectors, ids, factory=chosen, meta=meta, knobs=knobs_of(collection))
    except ValueError as exc:
        if chosen == normalise_factory("Flat"):
            raise
        # A kind FAISS cannot build for these vectors (PQ m not dividing d, ...): serve exact
        # search rather than nothing, and say why.
        log.error("index of %s cannot be built as %s (%s); serving Flat", collection.name, chosen, exc)
        error = f"cannot build {chosen[7:]}: {exc}; serving Flat"
        problem = factory_problem(collection, f"FAISS cannot build {chosen[7:]}: {exc}")
        problems.note(collection.id, problem, code=BAD_INDEX_FACTORY)
        index = build_index(vectors, ids, factory="Flat", meta=meta)
    seconds = time.perf_counter() - started
    index.update_meta(built_at=now(), build_seconds=round(seconds, 3))
    measure_recall(index, vectors, ids)
    return Fresh(index=index, seconds=seconds, error=error)


def measure_recall(index: VectorIndex | StoreIndex, vectors: np.ndarray, ids: np.ndarray) -> float:
    """Recall@10 of ``index`` against exact search over ``vectors`` (n, d) unit rows under ``ids``
    (n,), with held-out queries (``index.recall``); saved in the index's meta with the time."""
    if index.kind == "Flat" or len(ids) == 0:
        recall = 1.0  # exact search is its own ground truth
    else:
        recall = recall_at_k(index, vectors, ids, k=10, queries=RECALL_QUERIES)
    index.update_meta(recall_at_10=round(recall, 4), recall_measured_at=now())
    return recall
