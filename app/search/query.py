"""Query by example: decode, embed, search the index, fetch the rows; timed per stage."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from sqlalchemy import select

from app.catalog.collections import checkpoint_of, require_collection
from app.catalog.filters import ImageFilter, matching_ids
from app.context import AppContext
from app.core.errors import (
    CbirError,
    DegenerateImage,
    EmbedderNotReady,
    ImageNotFound,
    IndexMismatch,
    InvalidRequest,
)
from app.data.records import CollectionRecord, ImageRecord
from app.data.vector_rows import blob_of, blobs_of, micros, vectors_of
from app.embedding.codes import degenerate_codes
from app.imaging.decoding import decoding
from app.indexing.problems import VECTORS_REFUSED
from app.indexing.store_index import StoreIndex
from app.search.options import SearchOptions
from index import SearchKnobs
from index.exact import exact_search
from index.rerank import expand_queries
from index.store import Where
from models.base import Embedder

# A filter that leaves at most this many images is answered by an exact pass over their stored
# vectors (a few milliseconds), whatever the index kind: a graph or IVF search restricted by an id
# selector to a small set misses most of it.
EXACT_PASS_MAX = 4096


class HitRecord(Protocol):
    """What a hit shows of its stored image (an ``ImageRecord``, or the row of just these columns)."""

    @property
    def meta(self) -> dict[str, Any] | None: ...

    @property
    def original_name(self) -> str | None: ...


@dataclass(frozen=True)
class Hit:
    rank: int
    image_id: int
    score: float
    record: HitRecord


@dataclass
class SearchResult:
    collection: str
    k: int
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    query_image_id: int | None = None


class Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - self.last) * 1000, 3)
        self.last = now

    def done(self) -> dict[str, float]:
        self.laps["total"] = round((time.perf_counter() - self.start) * 1000, 3)
        return self.laps


def check_k(ctx: AppContext, k: int) -> None:
    if not 1 <= k <= ctx.settings.max_k:
        raise InvalidRequest(f"k must be between 1 and {ctx.settings.max_k}, got {k}")


def served_collection(ctx: AppContext, name: str) -> tuple[CollectionRecord, Any]:
    """The collection and its active checkpoint; EmbedderNotReady while it cannot be searched."""
    return _served(ctx, name)


def _served(ctx: AppContext, name: str) -> tuple[CollectionRecord, Any]:
    with ctx.db.session() as session:
        record = require_collection(session, name)
        checkpoint = checkpoint_of(session, record)
    if record.embedder_version is None:
        raise EmbedderNotReady(
            f"collection {name!r} has no trained {record.embedder} checkpoint yet, so it cannot be "
            f"searched; run `cbir train {record.embedder} --collection {name}`"
        )
    return record, checkpoint


def search_by_image(
    ctx: AppContext,
    *,
    collection: str,
    data: bytes,
    k: int,
    image_filter: ImageFilter | None = None,
    qe: int | None = None,
    knobs: SearchKnobs | None = None,
) -> SearchResult:
    check_k(ctx, k)
    clock = Clock()
    record, checkpoint = _served(ctx, collection)
    embedder, tensor = prepare(ctx, record=record, checkpoint=checkpoint, data=data)
    clock.lap("decode")
    vector = embedder.embed_prepared([tensor])
    if errors := degenerate_codes(vector, embedder=record.embedder, query=True):
        raise errors[0]
    clock.lap("embed")
    ctx.metrics.embedded("query", images=1, seconds=clock.laps["embed"] / 1000)
    return _search(
        ctx, record=record, vector=vector, k=k, clock=clock, image_filter=image_filter, qe=qe, knobs=knobs
    )


def prepare(
    ctx: AppContext, *, record: CollectionRecord, checkpoint: Any, data: bytes
) -> tuple[Embedder, Any]:
    """The embedder and the query decoded and preprocessed for it, within the decode memory
    budget; the decoded pixels are gone when this returns (the embedder's input is small)."""
    with decoding(ctx, data) as decoded:
        embedder = ctx.embedders.for_collection(record, checkpoint)
        return embedder, embedder.preprocess(decoded.image)


def similar_to(
    ctx: AppContext,
    *,
    collection: str,
    image_id: int,
    k: int,
    image_filter: ImageFilter | None = None,
    qe: int | None = None,
    knobs: SearchKnobs | None = None,
) -> SearchResult:
    """More like this: the stored vector of ``image_id`` as the query, the image itself left out."""
    check_k(ctx, k)
    clock = Clock()
    record, _ = _served(ctx, collection)
    assert record.embedder_version is not None  # _served checked it
    blob = blob_of(
        ctx.db, image_id=image_id, collection_id=record.id, embedder_version=record.embedder_version
    )
    if blob is None:
        raise ImageNotFound(f"image {image_id} is not in collection {collection!r} (or not embedded yet)")
    vector = np.frombuffer(blob, dtype="<f4").reshape(1, -1).astype(np.float32)
    refuse_set_aside(ctx, record=record, image_id=image_id, vector=vector)
    clock.lap("embed")
    result = _search(
        ctx,
        record=record,
        vector=vector,
        k=k,
        clock=clock,
        exclude=image_id,
        image_filter=image_filter,
        qe=qe,
        knobs=knobs,
    )
    result.query_image_id = image_id
    return result


def refuse_set_aside(ctx: AppContext, *, record: CollectionRecord, image_id: int, vector: np.ndarray) -> None:
    """422 degenerate_image for a stored row the index set aside (app/data/vector_rows.py): it cannot be
    a query. A row of another dimension than the index's is one, whatever the index's state: it
    must not get the 503 "retry shortly" of a search during a rebuild, since no rebuild mends it."""
    if errors := degenerate_codes(vector, embedder=record.embedder, query=True):
        raise errors[0]
    refused = ctx.indexes.problems.get(record.id, VECTORS_REFUSED)
    index = ctx.indexes.get(record)
    dim = int(vector.shape[1])
    if index is not None and index.ntotal and index.dim != dim:
        why = f"its stored vector has {dim} dimensions and the index's {index.dim}"
    elif refused is not None and image_id in refused.image_ids:
        why = "its stored vector is one the index cannot hold"
    else:
        return
    raise DegenerateImage(
        f"image {image_id} is set aside from the index of {record.name!r} ({why}), so it cannot be a "
        "query; see GET /api/v1/ready (vectors_refused)"
    )


def stored_codes(
    ctx: AppContext, *, record: CollectionRecord, image_ids: Collection[int]
) -> dict[int, np.ndarray | CbirError]:
    """Image id -> its stored (d,) code as a query, read in one query, or the error that id gets:
    404 for an image not in this collection or not embedded yet (another collection's image is not
    found either, as for /similar), 422 for a row the index set aside (``refuse_set_aside``)."""
    assert record.embedder_version is not None  # the caller checked that it serves
    wanted = sorted(set(image_ids))
    blobs = blobs_of(ctx.db, ids=wanted, embedder_version=record.embedder_version, collection_id=record.id)
    out: dict[int, np.ndarray | CbirError] = {}
    for image_id in wanted:
        blob = blobs.get(image_id)
        if blob is None:
            out[image_id] = ImageNotFound(
                f"image {image_id} is not in collection {record.name!r} (or not embedded yet)"
            )
            continue
        vector = np.frombuffer(blob, dtype="<f4").reshape(1, -1).astype(np.float32)
        try:
            refuse_set_aside(ctx, record=record, image_id=image_id, vector=vector)
        except CbirError as exc:
            out[image_id] = exc
        else:
            out[image_id] = vector[0]
    return out


def store_where(image_filter: ImageFilter) -> Where | None:
    """The filter as a vector store evaluates it (labels, created time), or None when it holds a
    metadata condition the store has no field for (the database then names the allowed ids)."""
    labels: set[str] | None = set(image_filter.labels) if image_filter.labels else None
    for key, value in image_filter.conditions:
        if key != "label":
            return None
        labels = {value} if labels is None else labels & {value}
    after = image_filter.created_after
    return Where(
        labels=None if labels is None else tuple(sorted(labels)),
        created_from=None if after is None else micros(after) + 1,  # strictly after, as in SQL
    )


def _search(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    vector: np.ndarray,
    k: int,
    clock: Clock,
    exclude: int | None = None,
    image_filter: ImageFilter | None = None,
    qe: int | None = None,
    knobs: SearchKnobs | None = None,
) -> SearchResult:
    """One query (a (1, d) row) through ``ranked``, then its rows fetched."""
    (pairs,) = ranked(
        ctx,
        record=record,
        vectors=vector,
        k=k,
        clock=clock,
        excludes=[exclude],
        image_filter=image_filter,
        qe=qe,
        knobs=knobs,
    )
    rows = rows_of(ctx, ids=[i for i, _ in pairs])
    hits = hits_of(pairs, rows)
    clock.lap("fetch")
    timings = clock.done()
    ctx.metrics.searched("single", timings)
    return SearchResult(collection=record.name, k=k, hits=hits, timings_ms=timings)


def rows_of(ctx: AppContext, *, ids: Sequence[int]) -> dict[int, HitRecord]:
    """The columns a hit shows, by image id: plain rows, not ORM objects (a batch's 1,000 hits
    loaded as ``ImageRecord`` objects took 14 ms, most of it the ORM's bookkeeping)."""
    if not ids:
        return {}
    query = select(ImageRecord.id, ImageRecord.meta, ImageRecord.original_name).where(
        ImageRecord.id.in_(set(ids))
    )
    with ctx.db.session() as session:
        return {row.id: row for row in session.execute(query)}


def hits_of(pairs: list[tuple[int, float]], rows: dict[int, HitRecord]) -> list[Hit]:
    return [
        Hit(rank=rank, image_id=image_id, score=score, record=rows[image_id])
        for rank, (image_id, score) in enumerate(((i, s) for i, s in pairs if i in rows), start=1)
    ]


def ranked(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    vectors: np.ndarray,
    k: int,
    clock: Clock,
    excludes: Sequence[int | Collection[int] | None],
    image_filter: ImageFilter | None = None,
    qe: int | None = None,
    knobs: SearchKnobs | None = None,
) -> list[list[tuple[int, float]]]:
    """The (id, score) pairs, best first, of each of ``vectors`` ((n, d) float32 unit rows), all
    searched in one index call; row i leaves out ``excludes[i]`` (its own image, for a stored
    query; the stored examples of a search by examples). With a filter, only among the ids that
    pass it: an exact pass over their stored vectors when they are few, else the index with a
    FAISS id selector.

    With query expansion (the collection's ``qe`` option, or ``qe`` here) each query is averaged
    with its first results' stored codes, weighted by similarity^alpha, and searched again.
    ``knobs`` (efSearch, nprobe, k_factor) override the index's search parameters for this search."""
    index = ctx.indexes.serving(record)
    if index is None:
        raise IndexMismatch(f"the index of {record.name!r} is not available yet; retry shortly")
    if index.ntotal == 0:
        clock.lap("search")
        return [[] for _ in excludes]
    if index.dim != vectors.shape[1]:
        raise IndexMismatch(
            f"the index of {record.name!r} holds {index.dim}-d vectors but the embedder gives "
            f"{vectors.shape[1]}-d; it is being rebuilt, retry shortly"
        )
    allowed = None
    exact: tuple[np.ndarray, np.ndarray] | None = None  # (vectors, ids) of a small filtered set
    where = store_where(image_filter) if image_filter and isinstance(index, StoreIndex) else None
    if where is not None:
        clock.lap("filter")  # evaluated by the vector store itself, with the search
    elif image_filter:
        with ctx.db.session() as session:
            allowed = matching_ids(session, collection_id=record.id, image_filter=image_filter)
        if len(allowed) <= EXACT_PASS_MAX:
            assert record.embedder_version is not None
            exact = vectors_of(ctx.db, ids=allowed, embedder_version=record.embedder_version)
        clock.lap("filter")
    left_out = [
        frozenset() if e is None else frozenset((e,)) if isinstance(e, int) else frozenset(e)
        for e in excludes
    ]
    extra = max((len(ids) for ids in left_out), default=0)

    def search(queries: np.ndarray) -> list[list[tuple[int, float]]]:
        if exact is not None:
            scores, ids = exact_search(queries, k + extra, vectors=exact[0], ids=exact[1])
        elif where is not None and isinstance(index, StoreIndex):
            scores, ids = index.search(queries, k + extra, where=where, knobs=knobs)
        else:
            scores, ids = index.search(queries, k + extra, allowed_ids=allowed, knobs=knobs)
        return [
            [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0 and i not in out][
                :k
            ]
            for row_ids, row_scores, out in zip(ids, scores, left_out, strict=True)
        ]

    answers = search(vectors)
    clock.lap("search")
    options = SearchOptions.of(record)
    if qe is not None:  # this search's depth, the collection's alpha
        options = SearchOptions(qe=qe, qe_alpha=options.qe_alpha)
    if options.qe and any(answers):
        expanded = np.concatenate(
            [
                _expand(
                    ctx,
                    record=record,
                    vector=vectors[i : i + 1],
                    top=pairs[: options.qe],
                    alpha=options.qe_alpha,
                )
                for i, pairs in enumerate(answers)
            ]
        )
        answers = [again if pairs else pairs for again, pairs in zip(search(expanded), answers, strict=True)]
        clock.lap("expand")
    return answers


def _expand(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    vector: np.ndarray,
    top: list[tuple[int, float]],
    alpha: float,
) -> np.ndarray:
    """alpha-QE with the stored codes of the first results (read from the database, so it works
    the same whatever the index kind)."""
    assert record.embedder_version is not None  # _served checked it
    ids = np.asarray([i for i, _ in top], dtype=np.int64)
    blobs = blobs_of(ctx.db, ids=ids, embedder_version=record.embedder_version)
    found = [(i, s) for i, s in top if i in blobs]
    if not found:
        return vector
    neighbours = np.stack([np.frombuffer(blobs[i], dtype="<f4") for i, _ in found]).astype(np.float32)
    return expand_queries(
        queries=vector,
        neighbours=neighbours[None],
        scores=np.asarray([[s for _, s in found]], dtype=np.float32),
        alpha=alpha,
    )
