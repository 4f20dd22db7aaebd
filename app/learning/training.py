"""Train a collection's own embedder (the CDAE) and re-embed the collection with it."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import delete, select

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import InvalidRequest
from app.data.records import CheckpointRecord, CollectionRecord, EmbeddingRecord, ImageRecord, utcnow
from app.data.vector_rows import drop_other_versions
from app.imaging.decoding import decoding_stored, never_stopped
from app.ingest.store import store_vectors
from models import cdae, registry
from models.base import Embedder

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)


def iter_collection_images(
    ctx: AppContext, *, collection_id: int, batch_size: int = 1024
) -> Iterator[tuple[list[int], list[Image.Image], list[dict[str, Any]]]]:
    """Decoded images of a collection in id order, in batches: (ids, images, metadata).

    Each decode waits for its room in the decode memory budget, as long as it takes, and is never
    refused for its size (``decoding_stored``). The room is held while the file decodes, its peak;
    the flat images a batch keeps are not counted (a batch of them may be larger than the budget)."""
    with ctx.db.session() as session:
        rows = session.execute(
            select(ImageRecord.id, ImageRecord.sha256, ImageRecord.format, ImageRecord.meta)
            .where(ImageRecord.collection_id == collection_id)
            .order_by(ImageRecord.id)
        ).all()

    def load(row: Any) -> Image.Image:
        with decoding_stored(ctx, ctx.store.read(row.sha256, row.format), stopped=never_stopped) as decoded:
            return decoded.image

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            yield [r.id for r in chunk], list(pool.map(load, chunk)), [r.meta for r in chunk]


def collection_size(ctx: AppContext, collection_id: int) -> int:
    from sqlalchemy import func

    with ctx.db.session() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(ImageRecord)
                .where(ImageRecord.collection_id == collection_id)
            )
            or 0
        )


def load_pixels(
    ctx: AppContext,
    *,
    collection: CollectionRecord,
    config: cdae.CDAEConfig,
    progress: Progress | None = None,
) -> np.ndarray:
    """The collection's images as uint8 arrays at the CDAE's input size, for training."""
    total = collection_size(ctx, collection.id)
    arrays: list[np.ndarray] = []
    for _, images, _ in iter_collection_images(ctx, collection_id=collection.id):
        arrays.extend(cdae.prepare_image(image, config=config) for image in images)
        if progress:
            progress(len(arrays), total)
    return np.stack(arrays) if arrays else np.zeros((0, config.image_size, config.image_size), np.uint8)


def check_trainable(ctx: AppContext, *, record: CollectionRecord) -> None:
    """InvalidRequest unless the collection may be given a CDAE (or a selection's winner).

    A collection serving another trained embedder (LeNet-5), or an untrained baseline that a
    selection chose (raw pixels, PCA), may switch; one created with a fixed embedder may not."""
    if record.embedder == "cdae" or registry.get_spec(record.embedder).trainable:
        return
    if record.checkpoint_id is not None:
        with ctx.db.session() as session:
            active = session.get(CheckpointRecord, record.checkpoint_id)
        if active is not None and (active.config or {}).get("selected_by") == "selection":
            return
    raise InvalidRequest(f"collection {record.name!r} uses embedder {record.embedder!r}, not 'cdae'")


def train_cdae(
    ctx: AppContext,
    *,
    collection: str,
    epochs: int | None = None,
    preset: str = "default",
    seed: int = 0,
    activate: bool = True,
    load_progress: Progress | None = None,
    train_progress: Callable[[int, int, int, float], None] | None = None,
    embed_progress: Progress | None = None,
) -> CheckpointRecord:
    """Train the CDAE on the collection's own images, record the checkpoint and (by default)
    make it the collection's embedder: its codes are recomputed and the index rebuilt."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
    check_trainable(ctx, record=record)
    config = cdae.CDAEConfig.preset(preset)
    pixels = load_pixels(ctx, collection=record, config=config, progress=load_progress)
    if len(pixels) == 0:
        raise InvalidRequest(f"collection {collection!r} has no images to train on")
    # the preset's schedule, as the selection trains it: a small collection gets more epochs
    epochs = cdae.epochs_for(config, images=len(pixels), epochs=epochs or None)
    result = cdae.train_cdae(
        pixels, config=config, epochs=epochs, device=ctx.device, seed=seed, progress=train_progress
    )
    # Unique even for two trainings in the same second (the file is never overwritten).
    relative = f"checkpoints/cdae-{collection}-{preset}-{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.pt"
    sha = cdae.save_checkpoint(
        ctx.settings.data_dir / relative,
        result=result,
        config=config,
        dataset={"collection": collection, "images": int(len(pixels)), "image_size": config.image_size},
    )
    with ctx.db.transaction() as session:
        checkpoint = CheckpointRecord(
            collection_id=record.id,
            embedder="cdae",
            version=f"cdae-{sha[:12]}",
            sha256=sha,
            path=relative,
            config={**config.to_dict(), "epochs": epochs, "preset": preset, "seed": seed},
            metrics={
                "epoch_losses": [float(x) for x in result.losses],
                "epoch_seconds": [float(x) for x in result.epoch_seconds],
            },
        )
        session.add(checkpoint)
    if activate:
        activate_checkpoint(ctx, collection=collection, checkpoint_id=checkpoint.id, progress=embed_progress)
    return checkpoint


def embed_collection(
    ctx: AppContext,
    *,
    collection: CollectionRecord,
    embedder: Embedder,
    progress: Progress | None = None,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every image of a collection: ((n, d) float32 unit rows, (n,) int64 ids).

    ``progress`` is called after every ``batch_size`` images (default: 1024 decoded at a time);
    it may raise to stop the work (a cancellation token's check)."""
    total = collection_size(ctx, collection.id)
    all_ids: list[int] = []
    chunks: list[np.ndarray] = []
    step = batch_size or 1024
    for ids, images, _ in iter_collection_images(ctx, collection_id=collection.id, batch_size=step):
        chunks.append(embedder.embed_prepared([embedder.preprocess(image) for image in images]))
        all_ids.extend(ids)
        if progress:
            progress(len(all_ids), total)
    if not chunks:
        return np.zeros((0, embedder.dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(chunks), np.asarray(all_ids, dtype=np.int64)


def activate_checkpoint(
    ctx: AppContext,
    *,
    collection: str,
    checkpoint_id: int,
    progress: Progress | None = None,
    computed: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Re-embed the collection with a checkpoint, then switch search to it and drop old vectors.

    The checkpoint may be of another trained embedder than the one served (a LeNet-5 checkpoint
    for a CDAE collection): the collection then switches embedder too. ``computed`` (codes, ids)
    skips the embedding when the caller has the codes already. Search keeps serving the
    previous version until the new vectors are all stored.
    """
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = session.get(CheckpointRecord, checkpoint_id)
    if checkpoint is None or checkpoint.collection_id not in (None, record.id):
        raise InvalidRequest(f"collection {collection!r} has no checkpoint {checkpoint_id}")
    embedder = ctx.embedders.get(checkpoint.embedder, checkpoint)
    if computed is not None:  # the caller has the codes already (whitened ones), as (vectors, ids)
        vectors, ids = computed
    else:
        vectors, ids = embed_collection(ctx, collection=record, embedder=embedder, progress=progress)
    with ctx.write_lock:
        with ctx.db.transaction() as session:
            replace_version(
                session,
                collection_id=record.id,
                embedder=checkpoint.embedder,
                version=embedder.version,
                codes=(vectors, ids),
            )
            _embed_stragglers(ctx, session=session, collection_id=record.id, embedder=embedder)
            live = session.get(CollectionRecord, record.id)
            assert live is not None
            live.embedder = checkpoint.embedder
            live.embedder_version = embedder.version
            live.checkpoint_id = checkpoint.id
            # Older versions' vectors are no longer served.
            drop_other_versions(session, collection_id=record.id, keep=embedder.version)
        with ctx.db.session() as session:
            ctx.indexes.build(require_collection(session, collection))


def replace_version(
    session: Any, *, collection_id: int, embedder: str, version: str, codes: tuple[np.ndarray, np.ndarray]
) -> None:
    """Store ``codes`` (vectors, ids) as a collection's rows of ``version``, replacing any it has
    (an interrupted switch or a re-embedding may have left some). Call under the write lock."""
    vectors, ids = codes
    session.execute(
        delete(EmbeddingRecord)
        .where(EmbeddingRecord.embedder_version == version)
        .where(
            EmbeddingRecord.image_id.in_(
                select(ImageRecord.id).where(ImageRecord.collection_id == collection_id)
            )
        )
    )
    for start in range(0, len(ids), 5000):
        store_vectors(
            session,
            image_ids=ids[start : start + 5000],
            vectors=vectors[start : start + 5000],
            embedder=embedder,
            embedder_version=version,
        )


def _embed_stragglers(ctx: AppContext, *, session: Any, collection_id: int, embedder: Embedder) -> None:
    """Embed images added while the collection was being re-embedded (under the write lock)."""
    have = select(EmbeddingRecord.image_id).where(EmbeddingRecord.embedder_version == embedder.version)
    rows = session.execute(
        select(ImageRecord.id, ImageRecord.sha256, ImageRecord.format)
        .where(ImageRecord.collection_id == collection_id)
        .where(ImageRecord.id.not_in(have))
    ).all()
    if not rows:
        return
    images = []
    for r in rows:  # no decode memory reserved: nothing waits for the budget under the write lock
        with decoding_stored(ctx, ctx.store.read(r.sha256, r.format), budget=False) as decoded:
            images.append(decoded.image)
    vectors = embedder.embed(images)
    store_vectors(
        session,
        image_ids=np.asarray([r.id for r in rows], dtype=np.int64),
        vectors=vectors,
        embedder=embedder.name,
        embedder_version=embedder.version,
    )
