"""A collection's served codes read back in chunks, with unusable rows set aside and counted."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sqlalchemy import select, update

from app.catalog.collections import create_collection, require_collection
from app.context import AppContext
from app.data.records import EmbeddingRecord
from app.duplicates import codes
from app.ingest.store import Item, ingest_batch


def test_codes_come_back_in_chunks_without_unusable_rows(
    ctx: AppContext, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    create_collection(ctx, name="shapes", embedder="tiny")
    ingest_batch(ctx, collection="shapes", items=[Item(f"{s}.png", make_png(s), {}) for s in range(7)])
    with ctx.db.transaction() as session:
        record = require_collection(session, "shapes")
        collection_id, version = record.id, record.embedder_version
        rows = session.execute(select(EmbeddingRecord.image_id, EmbeddingRecord.vector)).all()
        stored = {int(i): np.frombuffer(blob, "<f4") for i, blob in rows}
        first, second = sorted(stored)[:2]
        zero = np.zeros(64, "<f4").tobytes()
        session.execute(update(EmbeddingRecord).where(EmbeddingRecord.image_id == first).values(vector=zero))
        session.execute(
            update(EmbeddingRecord).where(EmbeddingRecord.image_id == second).values(vector=b"\0" * 12)
        )
    assert version is not None
    monkeypatch.setattr(codes, "CHUNK_VALUES", 128)
    monkeypatch.setattr(codes, "MIN_ROWS", 2)  # two rows a query: four chunks
    checks: list[int] = []

    vectors, ids, refused = codes.read_codes(
        ctx.db, collection_id=collection_id, embedder_version=version, check=lambda: checks.append(1)
    )

    assert refused == 2 and ids.tolist() == sorted(stored)[2:]
    assert vectors.shape == (5, 64) and vectors.dtype == np.float32
    assert np.array_equal(vectors[0], stored[ids[0]])
    assert len(checks) == 5  # before each chunk, and before the empty one that ends it
