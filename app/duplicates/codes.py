"""A collection's served codes read from the database (the source of truth, whichever vector store
serves searches) in chunks of rows, into one (n, d) array: memory is the array plus one chunk."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sqlalchemy import select

from app.data.db import Database
from app.data.records import EmbeddingRecord, ImageRecord
from app.data.vector_rows import count_vectors, stored_dim
from index.rows import unusable_rows

CHUNK_VALUES = 1 << 22  # floats read per query: 16 MB of blobs whatever the dimension
MIN_ROWS = 256  # rows read per query at least


def read_codes(
    db: Database, *, collection_id: int, embedder_version: str, check: Callable[[], None]
) -> tuple[np.ndarray, np.ndarray, int]:
    """((n, d) float32 unit rows, (n,) int64 ascending ids, rows set aside): the collection's
    vectors of ``embedder_version`` that an index can hold (a wrong length, a zero, NaN or a norm
    other than 1 is set aside and counted). ``check`` runs between chunks."""
    dim = stored_dim(db, collection_id=collection_id, embedder_version=embedder_version)
    expected = count_vectors(db, collection_id=collection_id, embedder_version=embedder_version)
    if dim is None or not expected:
        return np.zeros((0, dim or 0), np.float32), np.zeros(0, np.int64), 0
    vectors = np.empty((expected, dim), dtype=np.float32)
    ids = np.empty(expected, dtype=np.int64)
    filled = refused = 0
    last = -1
    step = max(MIN_ROWS, CHUNK_VALUES // dim)
    while True:
        check()
        with db.session() as session:
            rows = session.execute(
                select(EmbeddingRecord.image_id, EmbeddingRecord.vector)
                .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
                .where(ImageRecord.collection_id == collection_id)
                .where(EmbeddingRecord.embedder_version == embedder_version)
                .where(EmbeddingRecord.image_id > last)
                .order_by(EmbeddingRecord.image_id)
                .limit(step)
            ).all()
        if not rows:
            break
        last = int(rows[-1][0])
        sized = [(int(i), blob) for i, blob in rows if len(blob) == 4 * dim]
        block = np.frombuffer(b"".join(blob for _, blob in sized), dtype="<f4").reshape(len(sized), dim)
        good = ~unusable_rows(block) if len(block) else np.zeros(0, dtype=bool)
        refused += len(rows) - int(good.sum())
        kept = int(good.sum())
        if filled + kept > len(ids):  # images added since the count
            grow = max(kept, len(ids) // 4)
            vectors = np.concatenate([vectors, np.empty((grow, dim), np.float32)])
            ids = np.concatenate([ids, np.empty(grow, np.int64)])
        vectors[filled : filled + kept] = block[good]
        ids[filled : filled + kept] = np.fromiter((i for i, _ in sized), np.int64, len(sized))[good]
        filled += kept
    return vectors[:filled], ids[:filled], refused
