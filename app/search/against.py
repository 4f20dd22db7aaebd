"""What a query can be compared against: a compare spec (a registered embedder that needs no
training, such as ``pixels``, or ``checkpoint:ID``) resolved to an embedder, and the choices a
collection offers. The side-by-side comparison and the evaluation both resolve specs here."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import InvalidRequest, UnknownEmbedderName
from app.data.records import CheckpointRecord, CollectionRecord
from app.embedding.embedders import validate_embedder_name
from models import registry
from models.base import Embedder

__all__ = ["checkpoint_label", "compare_choices", "resolve_compare"]


def resolve_compare(
    ctx: AppContext, *, session: Session, collection: CollectionRecord, spec: str
) -> tuple[str, Embedder]:
    """A compare spec as (label, embedder): a registered embedder that needs no training
    (``pixels``) or ``checkpoint:ID``, a checkpoint of this collection; InvalidRequest if neither."""
    if spec.startswith("checkpoint:"):
        raw = spec.split(":", 1)[1]
        checkpoint = session.get(CheckpointRecord, int(raw)) if raw.isascii() and raw.isdigit() else None
        if checkpoint is None or checkpoint.collection_id not in (None, collection.id):
            raise InvalidRequest(f"collection {collection.name!r} has no checkpoint {raw[:20]!r}")
        return checkpoint_label(checkpoint), ctx.embedders.get(checkpoint.embedder, checkpoint)
    try:
        spec = validate_embedder_name(spec)
        trainable = registry.get_spec(spec).trainable
    except UnknownEmbedderName:
        raise InvalidRequest(
            f"unknown embedder {spec[:40]!r}; known: {', '.join(registry.names())}"
        ) from None
    if trainable:
        raise InvalidRequest(f"{spec!r} is trained per collection; compare with checkpoint:ID")
    return spec, ctx.embedders.get(spec)


def compare_choices(ctx: AppContext, collection: str) -> list[dict[str, str]]:
    """What a collection can be compared with: embedders that need no training, and its own
    checkpoints other than the active one."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoints = session.scalars(
            select(CheckpointRecord)
            .where(CheckpointRecord.collection_id == record.id)
            .order_by(CheckpointRecord.id.desc())
        ).all()
    weights_dir = ctx.settings.weights_dir
    choices = [
        {"spec": spec.name, "description": spec.description}
        for spec in map(registry.get_spec, registry.names())
        if not spec.trainable
        and spec.name != record.embedder
        # pretrained ones only when their weights are here: a choice must not fail when picked
        and (spec.weights_available is None or spec.weights_available(weights_dir))
    ]
    choices += [
        {"spec": f"checkpoint:{c.id}", "description": f"checkpoint {c.id}: {checkpoint_label(c)}"}
        for c in checkpoints
        if c.id != record.checkpoint_id
    ]
    return choices


def checkpoint_label(checkpoint: CheckpointRecord) -> str:
    config = checkpoint.config or {}
    epochs = config.get("epochs", "?")
    return f"{checkpoint.version} ({config.get('preset', '?')}, {epochs} epoch{'' if epochs == 1 else 's'})"
