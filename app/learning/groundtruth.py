"""Holidays-style evaluation: each query image of the collection ranked against the rest of it.

The ground truth maps a query's file name to the file names relevant to it (INRIA Holidays'
``groundtruth.json``); names are matched to the collection's images by original file name, or by
base name when that is unique. Each query is ranked against every other image of the collection,
itself excluded, and scored with INRIA's AP (trapezoid rule), P@10 and mAP@10.

Rows are the product of embedder specs x whitening dims x query-expansion depths, so one run
shows every configuration side by side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from sqlalchemy import select

from app.catalog.collections import checkpoint_of, require_collection
from app.context import AppContext
from app.core.cancel import NEVER, CancelToken, checking
from app.core.errors import InvalidRequest
from app.data.records import CollectionRecord, ImageRecord
from app.data.vector_rows import load_vectors
from app.embedding import cost
from app.embedding.embedders import validate_embedder_name
from app.learning.training import Progress, embed_collection
from index.metrics import evaluate_groundtruth
from index.rerank import expand_queries, fit_whitening
from models import registry

DEFAULT_QE_ALPHA = 3.0


@dataclass(frozen=True)
class GroundTruth:
    """The ranking's entries are named files: an image stored once under several names (same
    bytes) is one entry per name, so the protocol ranks exactly the files the ground truth lists."""

    rows: np.ndarray  # (m,) entry -> row of the collection's vectors
    queries: np.ndarray  # (q,) entries
    relevant: list[np.ndarray]  # entries relevant to each query (-1 for a name not found)
    unmatched: int  # relevant names that are not in the collection (they still count as misses)


def match_groundtruth(
    ctx: AppContext, *, collection_id: int, ids: np.ndarray, data: dict[str, list[str]]
) -> GroundTruth:
    """Resolve file names (original names and aliases) to entries over ``ids``' rows."""
    with ctx.db.session() as session:
        stored = session.execute(
            select(ImageRecord.id, ImageRecord.original_name, ImageRecord.meta).where(
                ImageRecord.collection_id == collection_id
            )
        ).all()
    row_of = {int(image_id): i for i, image_id in enumerate(ids)}
    rows: list[int] = []
    exact: dict[str, int] = {}
    base: dict[str, list[int]] = {}
    for image_id, name, meta in stored:
        if int(image_id) not in row_of:
            continue
        aliases = (meta or {}).get("aliases")
        names = [name] if name else []
        names += [a for a in aliases if isinstance(a, str)] if isinstance(aliases, list) else []
        for alias in names or [None]:
            entry = len(rows)
            rows.append(row_of[int(image_id)])
            if alias is not None and alias not in exact:
                exact[alias] = entry
                base.setdefault(PurePosixPath(alias).name, []).append(entry)

    def find(name: str) -> int | None:
        if name in exact:
            return exact[name]
        candidates = base.get(PurePosixPath(name).name, [])
        return candidates[0] if len(candidates) == 1 else None

    queries: list[int] = []
    relevant: list[np.ndarray] = []
    unmatched = 0
    for query, names_relevant in data.items():
        q = find(query)
        if q is None:
            continue
        # each relevant entry once, the query itself never (INRIA skips it)
        found = list(dict.fromkeys(p for p in (find(r) for r in names_relevant) if p is not None and p != q))
        missing = sum(1 for r in names_relevant if find(r) is None)
        unmatched += missing
        queries.append(q)
        # a miss stays in the denominator: AP counts every relevant name, found or not
        relevant.append(np.asarray(found + [-1] * missing, dtype=np.int64))
    if not queries:
        raise InvalidRequest(
            "none of the ground truth's query names matches an image of the collection by original "
            "file name; import the images with their file names (cbir import FOLDER)"
        )
    return GroundTruth(
        np.asarray(rows, dtype=np.int64), np.asarray(queries, dtype=np.int64), relevant, unmatched
    )


def rank_scores(
    vectors: np.ndarray, *, queries: np.ndarray, qe: int = 0, qe_alpha: float = DEFAULT_QE_ALPHA
) -> np.ndarray:
    """(q, n) similarities of each query row of ``vectors`` to all rows, itself at -inf; with
    ``qe`` > 0 the query is first expanded with its top ``qe`` results (alpha-QE)."""
    query_vectors = vectors[queries]
    scores = query_vectors @ vectors.T
    scores[np.arange(len(queries)), queries] = -np.inf
    if qe > 0:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :qe]
        expanded = expand_queries(
            queries=query_vectors,
            neighbours=vectors[top],
            scores=np.take_along_axis(scores, top, axis=1),
            alpha=qe_alpha,
        )
        scores = expanded @ vectors.T
        scores[np.arange(len(queries)), queries] = -np.inf
    return scores


def evaluate_with_groundtruth(
    ctx: AppContext,
    *,
    collection: str,
    groundtruth: dict[str, list[str]],
    embedders: Sequence[str] = (),
    whiten: Sequence[int] | None = None,
    qe: Sequence[int] | None = None,
    qe_alpha: float | None = None,
    progress: Progress | None = None,
    token: CancelToken = NEVER,
) -> list[dict[str, Any]]:
    """One row per (embedder, whitening dim, QE depth); 0 means no whitening / no expansion.

    Without ``embedders`` and ``whiten`` the collection is evaluated as served: its stored vectors
    (whitened when it serves a whitening) and its query expansion. With ``whiten`` (0: off) the
    network's own codes are evaluated (computed afresh when the served ones are whitened) and
    whitened here, one row per dim. Any other spec embeds the collection on the fly (nothing is stored) and
    reports its images per second. ``qe``/``qe_alpha`` default to the collection's search options.
    ``token`` is checked between batches and rows (Cancelled once it is set).
    """
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
    served = record.search_options or {}
    qe = tuple(qe) if qe else (int(served.get("qe", 0)),)
    qe_alpha = float(served.get("qe_alpha", DEFAULT_QE_ALPHA)) if qe_alpha is None else qe_alpha
    specs = [validate_embedder_name(spec) for spec in embedders] or [record.embedder]
    rows = []
    served_dim = (
        (checkpoint.config or {}).get("dim") if checkpoint is not None and _whitened(checkpoint) else None
    )
    as_served = whiten is None and not embedders and record.embedder_version is not None
    for spec in specs:
        token.check()
        if as_served:
            vectors, ids = load_vectors(
                ctx.db, collection_id=record.id, embedder_version=str(record.embedder_version)
            )
            speed = None
        else:
            vectors, ids, speed = _vectors(
                ctx, record=record, spec=spec, checkpoint=checkpoint, progress=progress, token=token
            )
        truth = match_groundtruth(ctx, collection_id=record.id, ids=ids, data=groundtruth)
        for dim in (0,) if as_served or whiten is None else whiten:
            token.check()
            started = time.perf_counter()
            if dim < 0:
                raise InvalidRequest(f"whiten must be 0 (off) or a number of dims, got {dim}")
            if dim:
                if dim > min(vectors.shape):
                    raise InvalidRequest(
                        f"whitening to {dim} dims needs at least {dim} images and {dim}-d codes "
                        f"({len(vectors)} images of {vectors.shape[1]} dims here)"
                    )
                projected = fit_whitening(vectors, dim=dim).apply(vectors)
            else:
                projected = vectors
            entries = projected[truth.rows]
            for depth in qe:
                token.check()
                scores = rank_scores(entries, queries=truth.queries, qe=depth, qe_alpha=qe_alpha)
                metrics = evaluate_groundtruth(scores=scores, relevant=truth.relevant, k=10)
                rows.append(
                    {
                        "embedder": spec,
                        "whiten": int(served_dim or 0) if as_served else int(dim),
                        "as_served": as_served,
                        "qe": int(depth),
                        "qe_alpha": qe_alpha if depth else None,
                        "queries": int(metrics["queries"]),
                        "database": int(len(truth.rows)),
                        "unmatched": truth.unmatched,
                        "p_at_10": round(float(metrics["p_at_10"]), 4),
                        "map_at_10": round(float(metrics["map_at_10"]), 4),
                        "map_all": round(float(metrics["map_all"]), 4),
                        "embed_img_s": speed,
                        "seconds": round(time.perf_counter() - started, 2),
                    }
                )
    return rows


def _whitened(checkpoint: Any) -> bool:
    return checkpoint is not None and (checkpoint.config or {}).get("kind") == "whitening"


def _vectors(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    spec: str,
    checkpoint: Any,
    progress: Progress | None,
    token: CancelToken,
) -> tuple[np.ndarray, np.ndarray, float | None]:
    if spec == record.embedder and record.embedder_version is not None and not _whitened(checkpoint):
        vectors, ids = load_vectors(ctx.db, collection_id=record.id, embedder_version=record.embedder_version)
        return vectors, ids, None
    if registry.get_spec(spec).trainable:
        raise InvalidRequest(
            f"{spec!r} is trained per collection; evaluate its checkpoint on the collection that serves it"
        )
    embedder = ctx.embedders.get(spec)
    started = time.perf_counter()

    each = cost.per_image(ctx, embedder=embedder, collection_id=record.id, measure=False).seconds
    vectors, ids = embed_collection(
        ctx,
        collection=record,
        embedder=embedder,
        progress=checking(progress, token),
        batch_size=cost.batch_size(each, largest=ctx.settings.embed_batch_size),
    )
    seconds = time.perf_counter() - started
    return vectors, ids, round(len(ids) / seconds, 1) if seconds > 0 and len(ids) else None
