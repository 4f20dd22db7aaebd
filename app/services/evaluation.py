"""Retrieval quality of a labelled collection: query images against it, same label = relevant."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

from app.context import AppContext
from app.datasets import DATASETS, load_mnist
from app.errors import InvalidRequest
from app.indexes import load_vectors
from app.records import CheckpointRecord, ImageRecord
from app.services.collections import checkpoint_of, require_collection
from app.services.training import Progress, embed_collection
from index.metrics import evaluate_retrieval
from models import registry
from models.base import Embedder


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
        metas = dict(
            session.execute(
                select(ImageRecord.id, ImageRecord.meta).where(ImageRecord.collection_id == collection_id)
            ).all()
        )
    labels = [str((metas.get(int(i)) or {}).get("label", "")) for i in ids]
    if any(label == "" for label in labels):
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
) -> list[dict[str, Any]]:
    """One result row per embedder: the collection's own first, then each ``compare`` spec.

    A compare spec is a registered embedder name (``pixels``) or ``checkpoint:ID`` (a trained
    checkpoint of this collection that is not the active one); the collection's images are
    embedded with it on the fly, nothing is stored.
    """
    query_set = load_queries(ctx, queries, limit=limit)
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        active_checkpoint = checkpoint_of(session, record)
        extra: list[tuple[str, Embedder]] = []
        for spec in compare:
            if spec.startswith("checkpoint:"):
                checkpoint = session.get(CheckpointRecord, int(spec.split(":", 1)[1]))
                if checkpoint is None:
                    raise InvalidRequest(f"there is no checkpoint {spec.split(':', 1)[1]}")
                extra.append(
                    (_checkpoint_label(checkpoint), ctx.embedders.get(checkpoint.embedder, checkpoint))
                )
            else:
                if registry.get_spec(spec).trainable:
                    raise InvalidRequest(f"{spec!r} is trained per collection; compare with checkpoint:ID")
                extra.append((spec, ctx.embedders.get(spec)))
    rows = []
    if record.embedder_version is not None:
        # The collection's own vectors as served, read back from the database.
        embedder = ctx.embedders.for_collection(record, active_checkpoint)
        label = _checkpoint_label(active_checkpoint) if active_checkpoint else embedder.version
        extra.insert(0, (label, embedder))
    for position, (label, embedder) in enumerate(extra):
        start = time.perf_counter()
        if position == 0 and record.embedder_version is not None:
            vectors, ids = load_vectors(
                ctx.db, collection_id=record.id, embedder_version=record.embedder_version
            )
        else:
            vectors, ids = embed_collection(ctx, collection=record, embedder=embedder, progress=progress)
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
            )
        )
    return rows


def _checkpoint_label(checkpoint: CheckpointRecord) -> str:
    config = checkpoint.config or {}
    return f"{checkpoint.version} ({config.get('preset', '?')}, {config.get('epochs', '?')} epochs)"


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
) -> dict[str, Any]:
    query_vectors = embedder.embed(query_set.images, batch_size=ctx.settings.embed_batch_size)
    metrics = evaluate_retrieval(
        query_vectors=query_vectors,
        query_labels=query_set.labels,
        db_vectors=db_vectors,
        db_labels=_labels_of(ctx, collection_id=collection_id, ids=db_ids),
        k=10,
    )
    return {
        "embedder": label,
        "queries": int(metrics["queries"]),
        "database": int(len(db_ids)),
        "p_at_10": round(float(metrics["p_at_10"]), 4),
        "map_at_10": round(float(metrics["map_at_10"]), 4),
        "map_all": round(float(metrics["map_all"]), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
