"""Bounded samples of a collection's stored vectors, for the map and the side-by-side compare."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from app.context import AppContext
from app.data.records import CollectionRecord, ImageRecord
from app.data.vector_rows import blobs_of
from index.projection import sample_positions

CHUNK = 5000  # ids per IN (...) list, well under SQLite's bound-parameter limit


def embedded_ids(ctx: AppContext, record: CollectionRecord) -> np.ndarray:
    """Ids (int64, ascending) of the collection's images that have a served vector: the served
    index's ids (checked against the database when it was loaded), so no table scan."""
    index = ctx.indexes.get(record)
    if index is None:
        return np.zeros(0, dtype=np.int64)
    return index.ids()


def sample_ids(ids: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` ids, evenly spread over ``ids`` (deterministic)."""
    return ids[sample_positions(len(ids), size)]


def stored_vectors(ctx: AppContext, record: CollectionRecord, ids: np.ndarray) -> np.ndarray:
    """The served vectors of ``ids`` (n, d) float32 unit rows, in the order of ``ids``."""
    version = record.embedder_version
    found = blobs_of(ctx.db, ids=ids, embedder_version=version) if version is not None else {}
    if not found:
        return np.zeros((0, 0), dtype=np.float32)
    return np.frombuffer(b"".join(found[int(i)] for i in ids), dtype="<f4").reshape(len(ids), -1)


def rows_of(ctx: AppContext, ids: np.ndarray, *columns: Any) -> dict[int, Any]:
    """``columns`` of the image rows of ``ids``, keyed by id."""
    out: dict[int, Any] = {}
    with ctx.db.session() as session:
        for start in range(0, len(ids), CHUNK):
            chunk = [int(i) for i in ids[start : start + CHUNK]]
            for row in session.execute(select(ImageRecord.id, *columns).where(ImageRecord.id.in_(chunk))):
                out[int(row[0])] = row
    return out
