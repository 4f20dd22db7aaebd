"""What ``GET /collections/{name}/index`` shows of a collection's index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.data.records import CollectionRecord
from app.indexing.store_index import StoreIndex
from index import VectorIndex
from index.kinds import AUTO


@dataclass(frozen=True)
class IndexStatus:
    """What ``GET /collections/{name}/index`` shows."""

    state: str  # "ready", "rebuilding" (an old index serves), "building" (none serves: 503), "none"
    factory: str  # the collection's setting: "auto" or a factory string
    kind: str | None  # the served index's factory, e.g. "HNSW32"
    ntotal: int
    dim: int | None
    memory_bytes: int
    tombstones: int
    high_water_mark: int
    params: dict[str, Any]
    recall_at_10: float | None
    recall_measured_at: str | None
    built_at: str | None
    build_seconds: float | None
    rebuild: dict[str, Any] | None  # the build in progress: target, reason, started_at, queued
    last_error: str | None
    problems: list[dict[str, Any]]  # index_problems.IndexProblem fields: what /ready reports


def status_of(
    collection: CollectionRecord,
    *,
    index: VectorIndex | StoreIndex | None,
    rebuild: dict[str, Any] | None,
    last_error: str | None,
    problems: list[dict[str, Any]],
) -> IndexStatus:
    """The status of ``collection`` served by ``index`` (None: none serves) with ``rebuild`` (the
    build in progress, None if none)."""
    meta = index.meta if index is not None else {}
    if rebuild is not None:
        state = "rebuilding" if index is not None else "building"
    else:
        state = "ready" if index is not None else "none"
    return IndexStatus(
        state=state,
        factory=collection.index_factory or AUTO,
        kind=index.kind if index is not None else None,
        ntotal=index.ntotal if index is not None else 0,
        dim=index.dim if index is not None and index.ntotal else None,
        memory_bytes=index.memory_bytes() if index is not None else 0,
        tombstones=index.tombstones if index is not None else 0,
        high_water_mark=index.high_water_mark if index is not None else -1,
        params=index.search_knobs().as_dict() if index is not None else {},
        recall_at_10=meta.get("recall_at_10"),
        recall_measured_at=meta.get("recall_measured_at"),
        built_at=meta.get("built_at"),
        build_seconds=meta.get("build_seconds"),
        rebuild=rebuild,
        last_error=last_error,
        problems=problems,
    )
