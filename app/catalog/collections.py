"""Collections: a named set of images with one embedder and one index."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.catalog.filters import ImageFilter, label_counts, where
from app.context import AppContext
from app.core.errors import CollectionExists, CollectionNotFound, InvalidRequest
from app.core.faults import fail_point
from app.data.records import CheckpointRecord, CollectionRecord, EmbeddingRecord, ImageRecord
from app.embedding.embedders import validate_embedder_name
from models import registry

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    embedder: str
    embedder_version: str | None
    dim: int | None
    checkpoint: dict[str, Any] | None
    image_count: int
    embedded_count: int
    index_size: int
    index_factory: str
    search_options: dict[str, Any]
    whitening: int | None
    ready: bool
    created_at: datetime
    tuning: dict[str, Any] | None = None  # the automatic tuning's switch, decision and table
    selection: dict[str, Any] | None = None  # how the served codes were chosen (docs/selection.md)


def require_collection(session: Session, name: str) -> CollectionRecord:
    record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == name))
    if record is None:
        raise CollectionNotFound(f"there is no collection named {name!r}")
    return record


def checkpoint_of(session: Session, collection: CollectionRecord) -> CheckpointRecord | None:
    if collection.checkpoint_id is None:
        return None
    return session.get(CheckpointRecord, collection.checkpoint_id)


def checkpoint_summary(checkpoint: CheckpointRecord | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    return {
        "id": checkpoint.id,
        "version": checkpoint.version,
        "sha256": checkpoint.sha256,
        "created_at": checkpoint.created_at.isoformat(),
        "config": checkpoint.config,
        "metrics": checkpoint.metrics,
    }


def selection_of(
    session: Session, record: CollectionRecord, active: CheckpointRecord | None
) -> dict[str, Any] | None:
    """The selection table shown with a collection: its active checkpoint's, else that of its
    latest checkpoint recorded with one that was measured and not activated (a CNN head that did
    not beat the codes), while the collection still serves the codes it was measured against."""
    recorded = ((active.metrics if active is not None else None) or {}).get("selection")
    if isinstance(recorded, dict):
        return recorded
    latest = session.scalars(
        select(CheckpointRecord)
        .where(CheckpointRecord.collection_id == record.id)
        .order_by(CheckpointRecord.id.desc())
        .limit(20)
    )
    for checkpoint in latest:
        recorded = (checkpoint.metrics or {}).get("selection")
        if isinstance(recorded, dict):
            kept = recorded.get("activated") is False
            return recorded if kept and recorded.get("served_version") == record.embedder_version else None
    return None


def create_collection(ctx: AppContext, *, name: str, embedder: str) -> CollectionInfo:
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(
            f"collection name {name!r} is invalid: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    embedder = validate_embedder_name(embedder)
    version = None
    if not registry.get_spec(embedder).trainable:
        version = ctx.embedders.get(embedder).version
    try:
        with ctx.db.transaction() as session:
            if session.scalar(select(CollectionRecord.id).where(CollectionRecord.name == name)):
                raise CollectionExists(f"a collection named {name!r} already exists")
            session.add(CollectionRecord(name=name, embedder=embedder, embedder_version=version))
    except IntegrityError:
        raise CollectionExists(f"a collection named {name!r} already exists") from None
    return get_collection(ctx, name)


def _info(ctx: AppContext, session: Session, record: CollectionRecord) -> CollectionInfo:
    image_count = session.scalar(
        select(func.count()).select_from(ImageRecord).where(ImageRecord.collection_id == record.id)
    )
    embedded = 0
    dim = None
    if record.embedder_version is not None:
        embedded, dim = session.execute(
            select(func.count(), func.max(EmbeddingRecord.dim))
            .select_from(EmbeddingRecord)
            .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
            .where(ImageRecord.collection_id == record.id)
            .where(EmbeddingRecord.embedder_version == record.embedder_version)
        ).one()
    index = ctx.indexes.get(record)
    checkpoint = checkpoint_of(session, record)
    whitening = (
        (checkpoint.config or {}).get("dim")
        if checkpoint and (checkpoint.config or {}).get("kind") == "whitening"
        else None
    )
    return CollectionInfo(
        name=record.name,
        embedder=record.embedder,
        embedder_version=record.embedder_version,
        dim=dim,
        checkpoint=checkpoint_summary(checkpoint),
        image_count=image_count or 0,
        embedded_count=embedded or 0,
        index_size=index.ntotal if index is not None else 0,
        index_factory=record.index_factory,
        search_options={
            "qe": int((record.search_options or {}).get("qe", 0)),
            "qe_alpha": float((record.search_options or {}).get("qe_alpha", 3.0)),
        },
        whitening=whitening,
        ready=record.embedder_version is not None,
        created_at=record.created_at,
        tuning=tuning_of(record, threshold=ctx.settings.autotune_min_images),
        selection=selection_of(session, record, checkpoint),
    )


def tuning_of(record: CollectionRecord, *, threshold: int) -> dict[str, Any]:
    """The automatic tuning's record (app/learning/autotune.py) as shown by the API: its switch
    (``auto``), the steps served and why, the validation table and the images it was fitted on;
    before the first tuning, a record saying what it waits for."""
    options = record.search_options or {}
    auto = bool(options.get("autotune", True))
    stored = options.get("tuning")
    if isinstance(stored, dict):
        served = stored.get("served_version")
        # the collection serves other codes since (a switch of embedder, a whitening by hand)
        state = "outdated" if served and served != record.embedder_version else stored.get("state")
        return {**stored, "state": state, "auto": auto, "threshold": threshold}
    pretrained = registry.get_spec(record.embedder).pretrained
    return {
        "auto": auto,
        "applies": pretrained,
        "state": "waiting" if pretrained else "not_applicable",
        "threshold": threshold,
        "validated": False,
        "fitted_on": None,
        "steps": [],
        "table": [],
    }


def get_collection(ctx: AppContext, name: str) -> CollectionInfo:
    with ctx.db.session() as session:
        return _info(ctx, session, require_collection(session, name))


def list_collections(ctx: AppContext) -> list[CollectionInfo]:
    with ctx.db.session() as session:
        records = session.scalars(select(CollectionRecord).order_by(CollectionRecord.name)).all()
        return [_info(ctx, session, record) for record in records]


def delete_collection(ctx: AppContext, name: str) -> None:
    """Remove a collection, its rows, vectors and index (files shared with others stay).

    Under the write lock, as a delete of one image: an upload of the same bytes into another
    collection cannot skip writing a file this is about to remove. The files are journalled before
    the commit, so a crash before they are gone leaves them to the next start's clean-up."""
    ctx.store.gate.check()  # read-only: 503 before anything is touched
    with ctx.write_lock:
        with ctx.db.transaction() as session:
            record = require_collection(session, name)
            images = [
                (sha, fmt)
                for sha, fmt in session.execute(
                    select(ImageRecord.sha256, ImageRecord.format).where(
                        ImageRecord.collection_id == record.id
                    )
                ).all()
            ]
            collection_id = record.id
            if ctx.store.journal is not None:
                ctx.store.journal.note(images)
            session.delete(record)
        ctx.indexes.drop(collection_id)
        _delete_unreferenced_files(ctx, images)
        if ctx.store.journal is not None:
            ctx.store.journal.settle(images)


def _delete_unreferenced_files(ctx: AppContext, images: list[Any]) -> None:
    with ctx.db.session() as session:
        for sha, fmt in images:
            if not session.scalar(select(ImageRecord.id).where(ImageRecord.sha256 == sha).limit(1)):
                ctx.store.delete(sha, fmt)


def browse_images(
    ctx: AppContext, name: str, *, offset: int, limit: int, image_filter: ImageFilter | None = None
) -> tuple[list[ImageRecord], int]:
    """A page of the collection's images in insertion order, and how many pass the filter."""
    with ctx.db.session() as session:
        record = require_collection(session, name)
        condition = where(image_filter) if image_filter else None
        conditions = [ImageRecord.collection_id == record.id]
        if condition is not None:
            conditions.append(condition)
        total = session.scalar(select(func.count()).select_from(ImageRecord).where(*conditions))
        rows = session.scalars(
            select(ImageRecord).where(*conditions).order_by(ImageRecord.id).offset(offset).limit(limit)
        ).all()
    return list(rows), int(total or 0)


@dataclass(frozen=True)
class LabelSummary:
    labels: list[tuple[str, int]]  # most common first
    distinct: int
    unlabelled: int
    total: int


def label_summary(ctx: AppContext, name: str, *, limit: int) -> LabelSummary:
    """The collection's labels with counts (one grouped query; about 0.2 s for 60,000 images)."""
    fail_point("labels")
    with ctx.db.session() as session:
        record = require_collection(session, name)
        counts = label_counts(session, collection_id=record.id)
    labelled = [(label, count) for label, count in counts if label is not None]
    return LabelSummary(
        labels=labelled[:limit],
        distinct=len(labelled),
        unlabelled=sum(count for label, count in counts if label is None),
        total=sum(count for _, count in counts),
    )
