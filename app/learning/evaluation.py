"""Retrieval quality of a labelled collection: query images against it, same label = relevant."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

from app.catalog.collections import checkpoint_of, require_collection
from app.context import AppContext
from app.core.cancel import NEVER, CancelToken, checking
from app.core.errors import InvalidRequest
from app.data.records import ImageRecord
from app.data.vector_rows import load_vectors
from app.embedding import cost
from app.ingest.sources.datasets import DATASETS, load_mnist
from app.learning.training import Progress, embed_collection
from app.search.against import checkpoint_label, resolve_compare
from index.metrics import evaluate_retrieval, precision_recall_curve
from models.base import Embedder

log = logging.getLogger(__name__)
# Images in each query set, for estimates before anything is loaded.
QUERY_SET_SIZES = {"mnist:train": 60_000, "mnist:test": 10_000}
# The labels each query set's images carry (the digits), for checks before anything is loaded.
QUERY_SET_LABELS = {name: frozenset(str(digit) for digit in range(10)) for name in QUERY_SET_SIZES}


@dataclass(frozen=True)
class QuerySet:
    name: str
    images: list[Image.Image]
    labels: np.ndarray  # (n,) str


def load_queries(ctx: AppContext, spec: str, *, limit: int | None = None) -> QuerySet:
    """``dataset:split`` (e.g. ``mnist:test``) as PIL images with string labels."""
    dataset, _, split = spec.partition(":")
    if dataset not in DATASETS or split not in DATASETS[dataset]:
        known = ", ".join(f"{d}:{s}" for d, splits in DATASETS.items() for s in splits)
        raise InvalidRequest(f"unknown query set {spec!r}; known: {known}")
    pixels, labels = load_mnist(
        split, datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir / "datasets"
    )
    if limit:
        pixels, labels = pixels[:limit], labels[:limit]
    return QuerySet(spec, [Image.fromarray(p) for p in pixels], labels.astype(str))


def _labels_of(ctx: AppContext, *, collection_id: int, ids: np.ndarray) -> np.ndarray:
    """The ``label`` metadata of each image id, as strings, in the order of ``ids``."""
    with ctx.db.session() as session:
        metas: dict[int, Any] = dict(
            session.execute(
                select(ImageRecord.id, ImageRecord.meta).where(ImageRecord.collection_id == collection_id)
            ).all()
        )
    found = [(metas.get(int(i)) or {}).get("label") for i in ids]
    labels = ["" if label is None else str(label) for label in found]
    if any(not label.strip() for label in labels):
        raise InvalidRequest("every image of the collection needs a 'label' in its metadata to be evaluated")
    return np.asarray(labels)


def evaluate(
    ctx: AppContext,
    *,
    collection: str,
    queries: str,
    compare: tuple[str, ...] = (),
    limit: int | None = None,
    progress: Progress | None = None,
    token: CancelToken = NEVER,
) -> list[dict[str, Any]]:
    """One result row per embedder: the collection's own first, then each ``compare`` spec.

    A compare spec is a registered embedder name (``pixels``) or ``checkpoint:ID`` (a trained
    checkpoint of this collection that is not the active one); the collection's images are
    embedded with it on the fly, nothing is stored. ``token`` is checked between batches of about
    half a second (Cancelled once it is set).
    """
    query_set = load_queries(ctx, queries, limit=limit)
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        active_checkpoint = checkpoint_of(session, record)
        extra = [resolve_compare(ctx, session=session, collection=record, spec=spec) for spec in compare]
    rows = []
    if record.embedder_version is not None:
        # The collection's own vectors as served, read back from the database.
        embedder = ctx.embedders.for_collection(record, active_checkpoint)
        label = checkpoint_label(active_checkpoint) if active_checkpoint else embedder.version
        extra.insert(0, (label, embedder))
    for position, (label, embedder) in enumerate(extra):
        token.check()
        start = time.perf_counter()
        if position == 0 and record.embedder_version is not None:
            vectors, ids = load_vectors(
                ctx.db, collection_id=record.id, embedder_version=record.embedder_version
            )
        else:
            each = cost.per_image(ctx, embedder=embedder, collection_id=record.id, measure=False)
            vectors, ids = embed_collection(
                ctx,
                collection=record,
                embedder=embedder,
                progress=checking(progress, token),
                batch_size=cost.batch_size(each.seconds, largest=ctx.settings.embed_batch_size),
            )
        rows.append(
            _score(
                ctx,
                label=label,
                embedder=embedder,
                query_set=query_set,
                db_vectors=vectors,
                db_ids=ids,
                collection_id=record.id,
                start=start,
                token=token,
            )
        )
    return rows


def embed_checked(
    ctx: AppContext, *, embedder: Embedder, images: list[Image.Image], token: CancelToken
) -> np.ndarray:
    """``embedder.embed(images)`` in batches of about half a second, checking ``token`` between."""
    largest = ctx.settings.embed_batch_size
    step = cost.batch_size(cost.forward_seconds(ctx, embedder=embedder, measure=False)[0], largest=largest)
    chunks = []
    for start in range(0, len(images), step):
        token.check()
        chunks.append(embedder.embed(images[start : start + step], batch_size=step))
    return np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), dtype=np.float32)


def _score(
    ctx: AppContext,
    *,
    label: str,
    embedder: Embedder,
    query_set: QuerySet,
    db_vectors: np.ndarray,
    db_ids: np.ndarray,
    collection_id: int,
    start: float,
    token: CancelToken = NEVER,
) -> dict[str, Any]:
    if len(db_ids) == 0:
        raise InvalidRequest("the collection has no embedded images to evaluate")
    query_vectors = embed_checked(ctx, embedder=embedder, images=query_set.images, token=token)
    db_labels = _labels_of(ctx, collection_id=collection_id, ids=db_ids)
    if len(db_labels) and not np.isin(query_set.labels, db_labels).any():
        shown = ", ".join(sorted(set(query_set.labels.tolist()))[:10])
        raise InvalidRequest(
            f"none of the labels of {query_set.name} ({shown}) occur in this collection, so every "
            "result would count as wrong; evaluate with queries labelled like the collection"
        )
    metrics, curve = _ranked(
        query_vectors=query_vectors,
        query_labels=query_set.labels,
        db_vectors=db_vectors,
        db_labels=db_labels,
        k=min(10, len(db_ids)),  # P@10 of a collection under 10 images: of all of them
        token=token,
    )
    return {
        "embedder": label,
        "queries": int(metrics["queries"]),
        "database": int(len(db_ids)),
        "p_at_10": round(float(metrics["p_at_10"]), 4),
        "map_at_10": round(float(metrics["map_at_10"]), 4),
        "map_all": round(float(metrics["map_all"]), 4),
        "pr_curve": {
            "recall": [round(r, 4) for r in curve["recall"]],
            "precision": [round(p, 4) for p in curve["precision"]],
        },
        "seconds": round(time.perf_counter() - start, 1),
    }


def _ranked(
    *,
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    db_vectors: np.ndarray,
    db_labels: np.ndarray,
    k: int,
    token: CancelToken,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``evaluate_retrieval`` and the 11-level ``precision_recall_curve`` over chunks of queries of
    about half a second, ``token`` checked between; both are means over queries, so each chunk's
    mean counts by its number of queries."""
    step = max(64, cost.batch_size(len(db_vectors) * cost.PAIR_S, largest=len(query_vectors)))
    sums = {"p_at_10": 0.0, "map_at_10": 0.0, "map_all": 0.0}
    precision = np.zeros(11, dtype=np.float64)
    recall = [i / 10 for i in range(11)]
    total = 0
    for start in range(0, len(query_vectors), step):
        token.check()
        queries, labels = query_vectors[start : start + step], query_labels[start : start + step]
        metrics = evaluate_retrieval(
            query_vectors=queries, query_labels=labels, db_vectors=db_vectors, db_labels=db_labels, k=k
        )
        curve = precision_recall_curve(
            query_vectors=queries, query_labels=labels, db_vectors=db_vectors, db_labels=db_labels, levels=11
        )
        count = int(metrics["queries"])
        for key in sums:
            sums[key] += float(metrics[key]) * count
        precision += np.asarray(curve["precision"], dtype=np.float64) * count
        recall = list(curve["recall"])
        total += count
    means: dict[str, float] = {key: value / max(total, 1) for key, value in sums.items()}
    means["queries"] = total
    return means, {"recall": recall, "precision": (precision / max(total, 1)).tolist()}


# -- in the background, cached -----------------------------------------------------------------
def query_sets() -> list[str]:
    return [f"{dataset}:{split}" for dataset, splits in DATASETS.items() for split in reversed(splits)]
