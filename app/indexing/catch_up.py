"""Catching a FAISS index loaded from its file (or served since) up with the database, the source
of truth: rows it lacks are replayed from the embeddings table, rows the database no longer holds
are removed; too large a difference is left to a rebuild."""

from __future__ import annotations

import logging

import numpy as np

from app.data.db import Database
from app.data.records import CollectionRecord
from app.data.vector_rows import vectors_of
from app.indexing.problems import VECTORS_REFUSED, IndexProblems
from index import VectorIndex

log = logging.getLogger(__name__)

# Replaying more than this share of a collection's rows (and over 1,000) costs more than a rebuild.
REPLAY_MAX_SHARE = 0.5


def catch_up(
    db: Database,
    collection: CollectionRecord,
    index: VectorIndex,
    db_ids: np.ndarray,
    *,
    problems: IndexProblems,
) -> tuple[int, int] | None:
    """Replay into ``index`` the database's rows (``db_ids``) it lacks and drop the ones the
    database no longer has: (replayed, removed); None when that is too much to be worth it, or the
    rows do not fit the index (rebuild instead)."""
    have = index.ids()
    missing = np.setdiff1d(db_ids, have, assume_unique=True)
    extra = np.setdiff1d(have, db_ids, assume_unique=True)
    if not missing.size and not extra.size:
        problems.note(collection.id, None, code=VECTORS_REFUSED)  # none left aside
        return 0, 0
    if missing.size > max(1000, REPLAY_MAX_SHARE * len(db_ids)):
        return None
    version = collection.embedder_version
    assert version is not None
    if extra.size:
        index.remove(extra)
    if missing.size:
        refused: dict[int, str] = {}  # rows the index cannot hold are always "missing"
        vectors, ids = vectors_of(db, ids=missing, embedder_version=version, refused=refused)
        if len(ids) and vectors.shape[1] != index.dim:
            return None
        if len(ids):
            index.add(vectors, ids)
        problems.refused(collection, refused)
    log.info(
        "index of %s caught up with the database: %d replayed above high-water mark %d, %d removed",
        collection.name,
        missing.size,
        index.high_water_mark,
        extra.size,
    )
    return int(missing.size), int(extra.size)
