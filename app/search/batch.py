"""Batch search: many queries (uploads and stored ids) embedded in one batch, searched in one
index call, each answered with its hits or its own error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.catalog.filters import ImageFilter
from app.context import AppContext
from app.core.errors import CbirError, InvalidRequest
from app.data.records import CollectionRecord
from app.embedding.codes import degenerate_codes
from app.search.query import (
    Clock,
    Hit,
    check_k,
    hits_of,
    prepare,
    ranked,
    rows_of,
    served_collection,
    stored_codes,
)
from index import SearchKnobs

MAX_BATCH = 100  # queries in one batch search


@dataclass(frozen=True)
class BatchQuery:
    """One query of a batch: an uploaded image's ``data``, a stored ``image_id`` of the
    collection, or an ``error`` found before the search (an empty or too large upload)."""

    data: bytes | None = None
    image_id: int | None = None
    error: CbirError | None = None


@dataclass
class BatchEntry:
    hits: list[Hit] = field(default_factory=list)
    error: CbirError | None = None


@dataclass
class BatchResult:
    collection: str
    k: int
    entries: list[BatchEntry]
    timings_ms: dict[str, float] = field(default_factory=dict)


def search_batch(
    ctx: AppContext,
    *,
    collection: str,
    queries: Sequence[BatchQuery],
    k: int,
    image_filter: ImageFilter | None = None,
    qe: int | None = None,
    knobs: SearchKnobs | None = None,
) -> BatchResult:
    """Up to ``MAX_BATCH`` queries answered as ``search_by_image`` and ``similar_to`` answer each:
    the uploads decoded one by one and embedded in one batch, the stored ids' vectors read in one
    query, every query searched in one index call and every hit's row fetched in one query. A
    query that cannot be searched (an image that does not decode, an id not in the collection)
    gets its error in its entry; the others are answered."""
    check_k(ctx, k)
    if not 1 <= len(queries) <= MAX_BATCH:
        raise InvalidRequest(f"a batch search takes 1 to {MAX_BATCH} queries, got {len(queries)}")
    clock = Clock()
    record, checkpoint = served_collection(ctx, collection)
    entries = [BatchEntry(error=query.error) for query in queries]
    vectors: dict[int, np.ndarray] = {}  # position in queries -> (d,) float32
    uploads = [i for i, q in enumerate(queries) if q.error is None and q.data is not None]
    if uploads:
        tensors: dict[int, Any] = {}
        embedder = ctx.embedders.for_collection(record, checkpoint)
        for i in uploads:
            try:
                _, tensors[i] = prepare(
                    ctx, record=record, checkpoint=checkpoint, data=queries[i].data or b""
                )
            except CbirError as exc:
                entries[i].error = _own(exc)
        clock.lap("decode")
        ready = [i for i in uploads if i in tensors]
        if ready:
            embedded = embedder.embed_prepared([tensors[i] for i in ready])
            faults = degenerate_codes(embedded, embedder=record.embedder, query=True)
            for row, i in enumerate(ready):
                if row in faults:
                    entries[i].error = faults[row]
                else:
                    vectors[i] = embedded[row]
        clock.lap("embed")
        ctx.metrics.embedded("query", images=len(ready), seconds=clock.laps["embed"] / 1000)
    stored = [i for i, q in enumerate(queries) if q.error is None and q.image_id is not None]
    if stored:
        vectors.update(
            _stored_vectors(ctx, record=record, queries=queries, positions=stored, entries=entries)
        )
        clock.lap("stored")
    order = sorted(vectors)
    if order:
        answers = ranked(
            ctx,
            record=record,
            vectors=np.stack([vectors[i] for i in order]).astype(np.float32),
            k=k,
            clock=clock,
            excludes=[queries[i].image_id for i in order],
            image_filter=image_filter,
            qe=qe,
            knobs=knobs,
        )
        rows = rows_of(ctx, ids=[image_id for pairs in answers for image_id, _ in pairs])
        for i, pairs in zip(order, answers, strict=True):
            entries[i].hits = hits_of(pairs, rows)
        clock.lap("fetch")
    timings = clock.done()
    ctx.metrics.searched("batch", timings)
    return BatchResult(collection=record.name, k=k, entries=entries, timings_ms=timings)


def _own(exc: CbirError) -> CbirError:
    """``exc`` when it is one query's own error (a 4xx); the whole request's (a 5xx) propagates."""
    if exc.status >= 500:
        raise exc
    return exc


def _stored_vectors(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    queries: Sequence[BatchQuery],
    positions: list[int],
    entries: list[BatchEntry],
) -> dict[int, np.ndarray]:
    """Position -> the stored (d,) vector of each stored-id query, read in one query; a missing
    or set-aside one gets its entry's error instead (``stored_codes``)."""
    codes = stored_codes(ctx, record=record, image_ids=[int(queries[i].image_id or 0) for i in positions])
    found: dict[int, np.ndarray] = {}
    for i in positions:
        code = codes[int(queries[i].image_id or 0)]
        if isinstance(code, CbirError):
            entries[i].error = _own(code)
        else:
            found[i] = code
    return found
