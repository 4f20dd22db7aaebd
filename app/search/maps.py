"""The map of a collection: its stored codes projected to 2-D (PCA, or UMAP where installed)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from app.context import AppContext
from app.core.errors import InvalidRequest
from app.data.records import CollectionRecord, ImageRecord
from app.embedding import cost
from app.search.query import served_collection
from app.search.sampling import embedded_ids, rows_of, sample_ids, stored_vectors
from index import id_checksum
from index.projection import METHODS, available_methods, pca_2d, umap_2d

MAX_SAMPLE = 10_000


@dataclass(frozen=True)
class MapPoint:
    id: int
    x: float
    y: float
    label: str | None


@dataclass(frozen=True)
class CollectionMap:
    collection: str
    embedder_version: str
    method: str
    total: int  # embedded images in the collection
    points: list[MapPoint]
    explained_variance: list[float] | None  # PCA only: share of variance of each axis


# Small and process-local: a map costs a few hundred ms (PCA) to tens of seconds (UMAP).
_CACHE: OrderedDict[tuple[object, ...], CollectionMap] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


def collection_map(ctx: AppContext, *, collection: str, sample: int, method: str) -> CollectionMap:
    if method not in METHODS:
        raise InvalidRequest(f"method must be one of {', '.join(METHODS)}, not {method[:20]!r}")
    if method not in available_methods():
        raise InvalidRequest(f"method {method!r} needs the umap-learn package, which is not installed")
    if not 1 <= sample <= MAX_SAMPLE:
        raise InvalidRequest(f"sample must be between 1 and {MAX_SAMPLE}, got {sample}")
    record, _ = served_collection(ctx, collection)
    ids = embedded_ids(ctx, record)
    chosen = sample_ids(ids, sample)
    key = (
        str(ctx.settings.data_dir),
        record.id,
        record.embedder_version,
        id_checksum(chosen),
        len(ids),
        method,
    )
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    _check_budget(ctx, record=record, sample=len(chosen), method=method)
    vectors = stored_vectors(ctx, record, chosen)
    variance: list[float] | None = None
    if method == "umap" and len(chosen) > 2:
        coords = umap_2d(vectors)
    else:
        coords, variance = pca_2d(vectors)
    metas = rows_of(ctx, chosen, ImageRecord.meta)
    points = []
    for image_id, (x, y) in zip(chosen.tolist(), coords.tolist(), strict=True):
        label = (metas[image_id].meta or {}).get("label") if image_id in metas else None
        points.append(MapPoint(image_id, round(x, 5), round(y, 5), None if label is None else str(label)))
    assert record.embedder_version is not None
    result = CollectionMap(
        collection=record.name,
        embedder_version=record.embedder_version,
        method=method,
        total=int(len(ids)),
        points=points,
        explained_variance=None if variance is None else [round(v, 4) for v in variance],
    )
    with _CACHE_LOCK:
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


def _terms(*, dim: int, method: str) -> tuple[float, float]:
    """(fixed seconds, seconds per point) of a map."""
    if method == "umap":
        return 0.0, cost.ROW_READ_S + cost.UMAP_S
    # PCA: the (d, d) covariance of the rows, then its eigenvectors
    return 4 * dim**3 * cost.FLOP_S, cost.ROW_READ_S + dim * dim * cost.FLOP_S


def _check_budget(ctx: AppContext, *, record: CollectionRecord, sample: int, method: str) -> None:
    """OverBudget (naming the sample that fits) when the map would take longer than the budget."""
    index = ctx.indexes.get(record)
    fixed, each = _terms(dim=index.dim if index is not None else 0, method=method)
    budget = ctx.settings.sync_cost_budget_s
    if fixed + sample * each <= budget:
        return
    fits = cost.largest_fitting(budget, fixed=fixed, each=each)
    cheaper = (
        f"ask for a smaller sample (sample={fits} fits)"
        if fits
        else f"not even a sample of 1 fits: raise {cost.SYNC}"
    )
    found = cost.plain(fixed + sample * each, f"{method} of {sample:,} codes")
    raise cost.over(
        f"the map of {record.name!r}",
        found,
        budget=budget,
        setting=cost.SYNC,
        cheaper=cheaper,
        fits_sample=fits,
    )


__all__ = ["CollectionMap", "MapPoint", "available_methods", "collection_map"]
