"""Switch a collection to another embedder as a background job, without a gap in search.

The job embeds every image that has no vector of the new embedder version yet, batch by batch,
each batch committed with the job's counters; search keeps using the old vectors meanwhile. When
none is missing it takes the write lock, embeds the images added in the meantime, switches the
collection to the new version, drops the old vectors and rebuilds the index. Because "missing a
vector of the new version" is read from the database every batch, an interrupted job resumes
where it stopped (on the next start) and never embeds an image twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sqlalchemy import func, select, update

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import CbirError, Conflict, InvalidRequest
from app.data.records import CollectionRecord, EmbeddingRecord, ImageRecord, JobRecord, utcnow
from app.data.vector_rows import drop_other_versions
from app.embedding.embedders import validate_embedder_name
from app.imaging.decoding import DecodeStopped, decoding_stored, never_stopped
from app.ingest.store import store_vectors
from models import registry
from models.base import Embedder

log = logging.getLogger(__name__)

BATCH = 256


def check_reembed(ctx: AppContext, *, collection: str, embedder: str) -> tuple[str, Embedder]:
    """The canonical spec and its loaded embedder; 422 for a trainable embedder (train it instead:
    `cbir train ...` re-embeds with the new checkpoint) or missing weights, 409 when the collection
    already serves that version."""
    spec = validate_embedder_name(embedder)
    if registry.get_spec(spec).trainable:
        raise InvalidRequest(
            f"{spec!r} is trained on the collection's own images: run `cbir train` for it, which "
            "re-embeds the collection with the new checkpoint"
        )
    model = ctx.embedders.get(spec)  # WeightsMissing (422) before any job exists
    with ctx.db.session() as session:
        record = require_collection(session, collection)
    # Serving the version but missing vectors of it (503 reembed_required): embedding them is the fix.
    if record.embedder_version == model.version and not missing_count(
        ctx, collection_id=record.id, version=model.version
    ):
        raise AlreadyServing(f"collection {collection!r} already serves {model.version}")
    return spec, model


class AlreadyServing(Conflict):
    code, title = "already_serving", "Already serving"


def missing_count(ctx: AppContext, *, collection_id: int, version: str) -> int:
    have = select(EmbeddingRecord.image_id).where(EmbeddingRecord.embedder_version == version)
    with ctx.db.session() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(ImageRecord)
                .where(ImageRecord.collection_id == collection_id)
                .where(ImageRecord.id.not_in(have))
            )
            or 0
        )


def _missing(session: Any, *, collection_id: int, version: str, limit: int) -> list[Any]:
    have = select(EmbeddingRecord.image_id).where(EmbeddingRecord.embedder_version == version)
    return session.execute(
        select(ImageRecord.id, ImageRecord.sha256, ImageRecord.format)
        .where(ImageRecord.collection_id == collection_id)
        .where(ImageRecord.id.not_in(have))
        .order_by(ImageRecord.id)
        .limit(limit)
    ).all()


def _embed_rows(
    ctx: AppContext,
    embedder: Embedder,
    rows: list[Any],
    pool: ThreadPoolExecutor,
    *,
    stopped: Callable[[], bool],
    budget: bool,
) -> np.ndarray:
    def prepare(row: Any) -> Any:
        data = ctx.store.read(row.sha256, row.format)
        with decoding_stored(ctx, data, stopped=stopped, budget=budget) as decoded:
            return embedder.preprocess(decoded.image)

    prepared = list(pool.map(prepare, rows))
    return embedder.embed_prepared(prepared)


def run_reembed(
    ctx: AppContext, *, job_id: str, collection: str, spec: str, should_stop: Any = lambda: False
) -> bool:
    """Embed what is missing, then switch; True when switched, False when stopped early."""
    embedder = ctx.embedders.get(spec)
    version = embedder.version
    with ctx.db.session() as session:
        record = require_collection(session, collection)
    missing = missing_count(ctx, collection_id=record.id, version=version)
    with ctx.db.transaction() as session:
        job = session.get(JobRecord, job_id)
        assert job is not None
        job.state, job.updated_at = "running", utcnow()
        job.owner = ctx.store.journal.path.name
        job.started_at = job.started_at or utcnow()
        job.total = job.done + missing
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="cbir-reembed") as pool:
        while True:
            if should_stop():
                return False
            with ctx.db.session() as session:
                rows = _missing(session, collection_id=record.id, version=version, limit=BATCH)
            if not rows:
                break
            try:
                embedded = _embed_batch(ctx, embedder, rows, pool, stopped=should_stop, budget=True)
            except DecodeStopped:
                return False  # stopped while waiting for decode memory: as any other stop
            with ctx.db.transaction() as session:
                _store(session, embedded, spec=spec, version=version)
                session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id)
                    .values(
                        done=JobRecord.done + len(rows),
                        added=JobRecord.added + len(rows),
                        updated_at=utcnow(),
                    )
                )
    _switch(ctx, collection=collection, spec=spec, embedder=embedder)
    return True


def _embed_batch(
    ctx: AppContext,
    embedder: Embedder,
    rows: list[Any],
    pool: ThreadPoolExecutor,
    *,
    stopped: Callable[[], bool],
    budget: bool,
) -> list[tuple[int, np.ndarray]]:
    """(image id, vector) per row. A stored file that no longer decodes (changed or lost on disk)
    fails the job, naming the image: the collection keeps serving its old vectors. Its size never
    does: a stored file is decoded whatever CBIR_MAX_DECODE_BYTES is now (``decoding_stored``).
    ``budget=False`` reserves no decode memory: under the write lock, which must not wait for it."""
    try:
        vectors = _embed_rows(ctx, embedder, rows, pool, stopped=stopped, budget=budget)
    except (CbirError, OSError):
        for row in rows:  # find the culprit
            try:
                _embed_rows(ctx, embedder, [row], pool, stopped=stopped, budget=budget)
            except (CbirError, OSError) as exc:
                raise StoredFileUnreadable(
                    f"the stored file of image {row.id} cannot be read or decoded ({exc}); restore it "
                    "or delete the image, then run the switch again"
                ) from None
        raise
    return [(r.id, v) for r, v in zip(rows, vectors, strict=True)]


class StoredFileUnreadable(CbirError):
    status, code, title = 500, "stored_file_unreadable", "Stored file unreadable"


def _store(session: Any, embedded: list[tuple[int, np.ndarray]], *, spec: str, version: str) -> None:
    ids, vectors = zip(*embedded, strict=True)
    store_vectors(
        session,
        image_ids=np.asarray(ids, dtype=np.int64),
        vectors=np.stack(vectors),
        embedder=spec,
        embedder_version=version,
    )


def _switch(ctx: AppContext, *, collection: str, spec: str, embedder: Embedder) -> None:
    with ctx.write_lock:
        with ctx.db.transaction() as session:
            record = require_collection(session, collection)
            # Images added while the job ran were embedded with the old version only.
            with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
                while rows := _missing(
                    session, collection_id=record.id, version=embedder.version, limit=BATCH
                ):
                    embedded = _embed_batch(ctx, embedder, rows, pool, stopped=never_stopped, budget=False)
                    _store(session, embedded, spec=spec, version=embedder.version)
                    session.flush()
            live = session.get(CollectionRecord, record.id)
            assert live is not None
            live.embedder = spec
            live.embedder_version = embedder.version
            live.checkpoint_id = None
            drop_other_versions(session, collection_id=record.id, keep=embedder.version)
        with ctx.db.session() as session:
            ctx.indexes.build(require_collection(session, collection))
