"""The same query side by side under two embedders, over the same bounded sample of a collection.

Left: the collection's own embedder, with its stored codes. Right: another embedder (``pixels``
or another checkpoint of the collection) whose codes for the sample are computed on the fly,
so the sample is bounded and both sides search exactly the same images. The work is estimated
first (app/embedding/cost.py): over CBIR_SYNC_COST_BUDGET_S it is refused, naming the sample that
fits; it checks its cancellation token between batches, so a client that leaves stops it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from app.catalog.images import get_image
from app.context import AppContext
from app.core.cancel import NEVER, CancelToken
from app.core.errors import DegenerateImage, ImageNotFound, InvalidRequest
from app.data.records import CollectionRecord, ImageRecord
from app.embedding import cost
from app.embedding.codes import degenerate_codes
from app.imaging.decoding import DecodeStopped, decoding, decoding_stored
from app.search.against import resolve_compare
from app.search.query import Hit, SearchResult, served_collection
from app.search.sampling import embedded_ids, rows_of, sample_ids, stored_vectors
from index import id_checksum
from models.base import Embedder

MAX_SAMPLE = 20_000
_CACHE: OrderedDict[tuple[object, ...], np.ndarray] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2  # a 20,000 x 784 float32 sample is 63 MB


@dataclass(frozen=True)
class Side:
    embedder: str
    source: str  # "stored codes" or "computed for this comparison"
    result: SearchResult


@dataclass(frozen=True)
class Comparison:
    collection: str
    k: int
    query_image_id: int | None
    sample: int
    total: int
    sides: list[Side]


def compare(
    ctx: AppContext,
    *,
    collection: str,
    against: str,
    k: int,
    sample: int,
    data: bytes | None = None,
    image_id: int | None = None,
    token: CancelToken = NEVER,
) -> Comparison:
    """Search ``sample`` images of the collection (evenly spread by id) for the query (uploaded
    ``data`` or stored ``image_id``) with the collection's embedder and with ``against``;
    OverBudget when that is estimated over the synchronous budget, Cancelled when ``token`` is."""
    if not 1 <= k <= ctx.settings.max_k:
        raise InvalidRequest(f"k must be between 1 and {ctx.settings.max_k}, got {k}")
    if not 1 <= sample <= MAX_SAMPLE:
        raise InvalidRequest(f"sample must be between 1 and {MAX_SAMPLE}, got {sample}")
    record, checkpoint = served_collection(ctx, collection)
    with ctx.db.session() as session:
        other_label, other = resolve_compare(ctx, session=session, collection=record, spec=against)
    own = ctx.embedders.for_collection(record, checkpoint)

    all_ids = embedded_ids(ctx, record)
    ids = sample_ids(all_ids, sample)
    _check_budget(ctx, record=record, own=own, other=other, label=other_label, ids=ids)
    token.check()
    if data is not None:
        # Both sides' inputs are prepared while the decode holds its reservation.
        with decoding(ctx, data) as decoded:
            own_query = _query_code(own, decoded.image, label=own.name)
            other_query = _query_code(other, decoded.image, label=other_label)
    else:
        assert image_id is not None
        stored = get_image(ctx, image_id)
        if stored.collection != record.name:
            raise ImageNotFound(f"image {image_id} is not in collection {collection!r}")
        own_query = stored_vectors(ctx, record, np.asarray([image_id], dtype=np.int64))
        if own_query.shape[0] != 1 or own_query.size == 0:
            raise ImageNotFound(f"image {image_id} has no stored code yet")
        if not _served(all_ids, image_id):
            # A stored row its index set aside (zero, NaN, another dimension: see /ready).
            raise DegenerateImage(
                f"image {image_id} has a stored code its index refused (listed in /api/v1/ready); "
                "it cannot be a query until it is re-embedded or deleted"
            )
        with decoding_stored(ctx, ctx.store.read(stored.record.sha256, stored.record.format)) as decoded:
            other_query = _query_code(other, decoded.image, label=other_label)

    start = time.perf_counter()
    left = _nearest(
        ctx, vectors=stored_vectors(ctx, record, ids), ids=ids, query=own_query, k=k, exclude=image_id
    )
    left.timings_ms["total"] = round((time.perf_counter() - start) * 1000, 3)

    start = time.perf_counter()
    codes = _sample_codes(ctx, record=record, embedder=other, ids=ids, token=token)
    right = _nearest(ctx, vectors=codes, ids=ids, query=other_query, k=k, exclude=image_id)
    right.timings_ms["total"] = round((time.perf_counter() - start) * 1000, 3)

    own_label = record.embedder_version or record.embedder
    return Comparison(
        collection=record.name,
        k=k,
        query_image_id=image_id,
        sample=int(len(ids)),
        total=int(len(all_ids)),
        sides=[
            Side(own_label, "stored codes", _named(left, record.name, image_id)),
            Side(other_label, "computed for this comparison", _named(right, record.name, image_id)),
        ],
    )


def _served(ids: np.ndarray, image_id: int) -> bool:
    """Whether ``image_id`` is among ``ids`` (int64, ascending: the served index's)."""
    at = int(np.searchsorted(ids, image_id))
    return at < len(ids) and int(ids[at]) == image_id


def _query_code(embedder: Embedder, image: Image.Image, *, label: str) -> np.ndarray:
    """(1, d) code of the query under ``embedder``; 422 degenerate_image when it has none."""
    code = embedder.embed_prepared([embedder.preprocess(image)])
    if errors := degenerate_codes(code, embedder=label, query=True):
        raise errors[0]
    return code


def _named(result: SearchResult, collection: str, image_id: int | None) -> SearchResult:
    result.collection = collection
    result.query_image_id = image_id
    return result


def _nearest(
    ctx: AppContext, *, vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, exclude: int | None
) -> SearchResult:
    """Exact top k of ``query`` (1, d) among ``vectors`` (n, d), ties in id order."""
    start = time.perf_counter()
    scores = vectors @ query[0] if len(ids) else np.zeros(0, dtype=np.float32)
    if exclude is not None:
        scores = np.where(ids == exclude, -np.inf, scores)
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[np.isfinite(scores[order])]
    search_ms = round((time.perf_counter() - start) * 1000, 3)
    records = rows_of(ctx, ids[order], ImageRecord)
    hits = [
        Hit(rank=rank, image_id=int(ids[i]), score=float(scores[i]), record=records[int(ids[i])][1])
        for rank, i in enumerate(order, start=1)
        if int(ids[i]) in records
    ]
    return SearchResult(collection="", k=k, hits=hits, timings_ms={"search": search_ms})


def _check_budget(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    own: Embedder,
    other: Embedder,
    label: str,
    ids: np.ndarray,
) -> None:
    """OverBudget unless embedding the sample (unless cached) and both searches fit the budget."""
    n = len(ids)
    cached = _cached(_cache_key(ctx, record, other, ids)) is not None
    search_each = cost.ROW_READ_S + (own.dim + other.dim) * cost.FLOP_S

    def build(measure: bool) -> cost.Estimate:
        embed = cost.embedding(
            ctx, embedder=other, collection_id=record.id, images=(0 if cached else n) + 1, measure=measure
        )
        return embed + cost.plain(n * search_each)

    budget = ctx.settings.sync_cost_budget_s
    found = cost.estimate(build, budget=budget)
    if found.seconds <= budget:
        return
    each = cost.per_image(ctx, embedder=other, collection_id=record.id, measure=False).seconds
    fits = cost.largest_fitting(budget, fixed=each, each=each + search_each)
    cheaper = (
        f"ask for a smaller sample (sample={fits} fits)"
        if fits
        else f"not even a sample of 1 fits: compare with a faster embedder, or raise {cost.SYNC}"
    )
    raise cost.over(
        f"comparing a sample of {n:,} images with {label}",
        found,
        budget=budget,
        setting=cost.SYNC,
        cheaper=cheaper,
        fits_sample=fits,
    )


def _cache_key(
    ctx: AppContext, record: CollectionRecord, embedder: Embedder, ids: np.ndarray
) -> tuple[object, ...]:
    return (str(ctx.settings.data_dir), record.id, embedder.version, id_checksum(ids))


def _cached(key: tuple[object, ...]) -> np.ndarray | None:
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    return None


def _sample_codes(
    ctx: AppContext, *, record: CollectionRecord, embedder: Embedder, ids: np.ndarray, token: CancelToken
) -> np.ndarray:
    """``embedder``'s codes of the sample (cached for the last two samples), in batches of about
    half a second with a look at ``token`` between them."""
    key = _cache_key(ctx, record, embedder, ids)
    found = _cached(key)
    if found is not None:
        return found
    rows = rows_of(ctx, ids, ImageRecord.sha256, ImageRecord.format)

    def load(image_id: int) -> torch.Tensor:
        row = rows[image_id]
        data = ctx.store.read(row.sha256, row.format)
        with decoding_stored(ctx, data, stopped=lambda: token.cancelled) as decoded:
            return embedder.preprocess(decoded.image)

    chunks = []
    each = cost.per_image(ctx, embedder=embedder, collection_id=record.id, measure=False).seconds
    batch = cost.batch_size(each, largest=ctx.settings.embed_batch_size)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(ids), batch):
            token.check()
            try:
                tensors = list(pool.map(load, [int(i) for i in ids[start : start + batch]]))
            except DecodeStopped:
                token.check()  # the token stopped the wait for decode memory: Cancelled
                raise
            chunks.append(embedder.embed_prepared(tensors))
    codes = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), dtype=np.float32)
    with _CACHE_LOCK:
        _CACHE[key] = codes
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return codes
