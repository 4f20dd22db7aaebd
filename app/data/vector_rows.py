"""Reading a collection's stored vectors (the embeddings table) for its index and its analyses.

Every reader gets only the rows an index can hold: a blob of another length than the version's
(a wrong dimension), a zero row, a NaN or an infinity, a norm other than 1 (index/rows.py) is set
aside, and named in ``refused`` (image id -> why) when the caller passes a dict. One such row,
restored from a backup or written by an older version, must never stop a start or a search.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.data.db import Database
from app.data.records import EmbeddingRecord, ImageRecord
from index.rows import row_faults, unusable_rows

CHUNK = 5000  # ids per IN (...) list, well under SQLite's bound-parameter limit
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SCREEN_VALUES = 1 << 22  # floats checked at once: the temporaries stay at 32 MB whatever n and d


def _served_rows(collection_id: int, embedder_version: str) -> Any:
    return (
        select(EmbeddingRecord.image_id)
        .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
        .where(ImageRecord.collection_id == collection_id)
        .where(EmbeddingRecord.embedder_version == embedder_version)
    )


def _usable(
    rows: Sequence[tuple[int, bytes]], refused: dict[int, str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(image id, little-endian float32 blob) rows, ascending by id -> ((m, d) float32, (m,) int64)
    of those an index can hold; ``d`` is the length most rows have. The others go to ``refused``."""
    if not rows:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    size = Counter(len(blob) for _, blob in rows).most_common(1)[0][0]
    sized = [row for row in rows if len(row[1]) == size] if size % 4 == 0 and size else []
    if refused is not None and len(sized) < len(rows):
        kept = {image_id for image_id, _ in sized}
        refused.update(
            (int(i), f"wrong_dimension ({len(blob)} bytes, not {size})") for i, blob in rows if i not in kept
        )
    ids = np.fromiter((row[0] for row in sized), dtype=np.int64, count=len(sized))
    vectors = np.frombuffer(b"".join(row[1] for row in sized), dtype="<f4").reshape(len(sized), -1)
    step = max(1, _SCREEN_VALUES // max(1, vectors.shape[1]))
    bad = np.concatenate(
        [unusable_rows(vectors[start : start + step]) for start in range(0, len(ids), step)]
        or [np.zeros(0, dtype=bool)]
    )
    if bad.any():
        if refused is not None:
            faults = row_faults(vectors[bad])
            refused.update((int(i), str(fault)) for i, fault in zip(ids[bad], faults, strict=True))
        ids, vectors = ids[~bad], vectors[~bad]
    return vectors.astype(np.float32, copy=False), ids


def load_ids(db: Database, *, collection_id: int, embedder_version: str) -> np.ndarray:
    """Ids (int64, ascending) of the collection's images with a vector of this version; no vectors."""
    with db.session() as session:
        ids = session.execute(_served_rows(collection_id, embedder_version)).scalars().all()
    return np.sort(np.fromiter(ids, dtype=np.int64, count=len(ids)))


def load_vectors(
    db: Database, *, collection_id: int, embedder_version: str, refused: dict[int, str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The stored vectors of one collection and version an index can hold: ((n, d) float32 unit
    rows, (n,) int64 ascending ids); the rows set aside go to ``refused``."""
    stmt = (
        select(EmbeddingRecord.image_id, EmbeddingRecord.vector)
        .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
        .where(ImageRecord.collection_id == collection_id)
        .where(EmbeddingRecord.embedder_version == embedder_version)
        .order_by(EmbeddingRecord.image_id)
    )
    with db.session() as session:
        rows = session.execute(stmt).all()
    return _usable([(row[0], row[1]) for row in rows], refused)


def stored_dim(db: Database, *, collection_id: int, embedder_version: str) -> int | None:
    """The dimension most of the collection's stored vectors of this version have (None when it has
    none): one row of another dimension (a restored backup's) must not outvote the rest."""
    with db.session() as session:
        return session.scalar(
            select(EmbeddingRecord.dim)
            .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
            .where(ImageRecord.collection_id == collection_id)
            .where(EmbeddingRecord.embedder_version == embedder_version)
            .group_by(EmbeddingRecord.dim)
            .order_by(func.count().desc())
            .limit(1)
        )


def count_vectors(db: Database, *, collection_id: int, embedder_version: str) -> int:
    """How many vectors of this version the collection's images have (rows set aside included)."""
    with db.session() as session:
        count = session.scalar(
            select(func.count())
            .select_from(EmbeddingRecord)
            .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
            .where(ImageRecord.collection_id == collection_id)
            .where(EmbeddingRecord.embedder_version == embedder_version)
        )
    return int(count or 0)


def blob_of(db: Database, *, image_id: int, collection_id: int, embedder_version: str) -> bytes | None:
    """The stored vector blob (little-endian float32, unscreened) of one image of the collection, or
    None when it is not the collection's or has no vector of this version."""
    found = blobs_of(db, ids=[image_id], embedder_version=embedder_version, collection_id=collection_id)
    return found.get(image_id)


def has_images(db: Database, *, collection_id: int) -> bool:
    with db.session() as session:
        found = session.scalar(
            select(ImageRecord.id).where(ImageRecord.collection_id == collection_id).limit(1)
        )
    return found is not None


def vectors_of(
    db: Database, *, ids: np.ndarray, embedder_version: str, refused: dict[int, str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The stored vectors of ``ids`` of one version: ((m, d) float32, (m,) int64 ascending ids);
    ids without such a vector are left out, and so are the rows set aside (into ``refused``)."""
    found = blobs_of(db, ids=ids, embedder_version=embedder_version)
    return _usable([(i, found[i]) for i in sorted(found)], refused)


def blobs_of(
    db: Database, *, ids: Any, embedder_version: str, collection_id: int | None = None
) -> dict[int, bytes]:
    """Image id -> the stored vector blob of one version (little-endian float32), unscreened; ids
    without such a vector (or, given ``collection_id``, not of that collection) are absent."""
    ids = list(ids)
    found: dict[int, bytes] = {}
    with db.session() as session:
        for start in range(0, len(ids), CHUNK):
            chunk = [int(i) for i in ids[start : start + CHUNK]]
            query = (
                select(EmbeddingRecord.image_id, EmbeddingRecord.vector)
                .where(EmbeddingRecord.image_id.in_(chunk))
                .where(EmbeddingRecord.embedder_version == embedder_version)
            )
            if collection_id is not None:
                query = query.join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id).where(
                    ImageRecord.collection_id == collection_id
                )
            found.update(session.execute(query).all())
    return found


def drop_other_versions(session: Session, *, collection_id: int, keep: str) -> None:
    """Delete the collection's vectors of every embedder version but ``keep`` (once it serves
    ``keep``, older versions' vectors are no longer served), in the caller's transaction."""
    session.execute(
        delete(EmbeddingRecord)
        .where(EmbeddingRecord.embedder_version != keep)
        .where(
            EmbeddingRecord.image_id.in_(
                select(ImageRecord.id).where(ImageRecord.collection_id == collection_id)
            )
        )
    )


def label_text(value: Any) -> str | None:
    """A metadata label as the database's filters compare it (``meta_text``): text as it is, a
    number in its JSON spelling; None for no label."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else json.dumps(value)


def micros(moment: datetime) -> int:
    """An instant as int64 microseconds since the epoch; a naive one (SQLite's) is UTC."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def fields_of(db: Database, *, ids: np.ndarray) -> dict[int, tuple[str | None, int]]:
    """Image id -> (label, created microseconds): the scalar fields a vector store filters on."""
    found: dict[int, tuple[str | None, int]] = {}
    with db.session() as session:
        for start in range(0, len(ids), CHUNK):
            chunk = [int(i) for i in ids[start : start + CHUNK]]
            for image_id, meta, created in session.execute(
                select(ImageRecord.id, ImageRecord.meta, ImageRecord.created_at).where(
                    ImageRecord.id.in_(chunk)
                )
            ):
                label = meta.get("label") if isinstance(meta, dict) else None
                found[int(image_id)] = (label_text(label), micros(created))
    return found
