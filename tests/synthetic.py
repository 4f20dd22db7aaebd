"""Synthetic image rows with given vectors, straight into the database: for scale tests and the
restart benchmark, where a million real uploads would take hours. The rows have no files."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select

from app.data.db import Database
from app.data.records import ImageRecord, utcnow
from app.ingest.store import store_vectors

BATCH = 20_000


def insert_synthetic(
    db: Database,
    *,
    collection_id: int,
    vectors: np.ndarray,
    embedder: str,
    embedder_version: str,
    metas: Sequence[dict[str, Any]] | None = None,
    created_at: Sequence[datetime] | None = None,
    tag: str = "synthetic",
) -> np.ndarray:
    """Insert one image row and one embedding per row of ``vectors`` (n, d) float32 unit rows;
    returns their ids (n,) int64 in row order. ``tag`` keeps the fake SHA-256s of two calls apart."""
    ids: list[np.ndarray] = []
    for start in range(0, len(vectors), BATCH):
        stop = min(start + BATCH, len(vectors))
        now = utcnow()
        rows = [
            {
                "collection_id": collection_id,
                "sha256": hashlib.sha256(f"{tag}-{collection_id}-{i}".encode()).hexdigest(),
                "byte_size": 0,
                "format": "PNG",
                "width": 28,
                "height": 28,
                "original_name": None,
                "meta": dict(metas[i]) if metas is not None else {},
                "created_at": created_at[i] if created_at is not None else now,
            }
            for i in range(start, stop)
        ]
        with db.transaction() as session:
            before = session.scalar(select(func.max(ImageRecord.id))) or 0
            session.execute(insert(ImageRecord), rows)
            batch_ids = np.asarray(
                session.scalars(
                    select(ImageRecord.id)
                    .where(ImageRecord.collection_id == collection_id)
                    .where(ImageRecord.id > before)
                    .order_by(ImageRecord.id)
                ).all(),
                dtype=np.int64,
            )
            if len(batch_ids) != stop - start:
                raise RuntimeError("another writer inserted rows meanwhile; run synthetic inserts alone")
            store_vectors(
                session,
                image_ids=batch_ids,
                vectors=vectors[start:stop],
                embedder=embedder,
                embedder_version=embedder_version,
            )
        ids.append(batch_ids)
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
