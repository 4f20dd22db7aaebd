"""Supervised neural codes: train a classifier on a collection's labels, serve its features.

The collection's images and their ``label`` metadata train an arch of ``models.classifier``
(LeNet-5 from pixels, or a head on a frozen pretrained CNN's codes); the checkpoint is
recorded and, by default, activated: the collection switches to the arch's embedder, its codes
are recomputed and the index rebuilt.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import select

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import InvalidRequest
from app.data.records import CheckpointRecord, CollectionRecord, ImageRecord, utcnow
from app.data.vector_rows import load_vectors
from app.learning.head_selection import compare, head_split, served_codes, too_few_labels, unvalidated
from app.learning.training import (
    Progress,
    activate_checkpoint,
    collection_size,
    embed_collection,
    iter_collection_images,
)
from models import registry
from models.classifier import ClassifierArch, get_arch

log = logging.getLogger(__name__)


def _label(meta: dict[str, Any] | None) -> str:
    value = (meta or {}).get("label")
    return "" if value is None else str(value).strip()


def check_labels(ctx: AppContext, *, collection: CollectionRecord) -> list[str]:
    """The collection's class names, sorted; InvalidRequest when fewer than two classes are
    labelled (reads metadata only, before any image is decoded)."""
    with ctx.db.session() as session:
        metas = session.scalars(
            select(ImageRecord.meta).where(ImageRecord.collection_id == collection.id)
        ).all()
    if not metas:
        raise InvalidRequest(f"collection {collection.name!r} has no images to train on")
    classes = sorted({_label(meta) for meta in metas} - {""})
    if not classes:
        raise InvalidRequest(
            f"collection {collection.name!r} has no labels: a classifier trains on the 'label' "
            "metadata of its images (import an archive with one folder per class, or a labelled dataset)"
        )
    if len(classes) < 2:
        raise InvalidRequest(
            f"collection {collection.name!r} has one label ({classes[0]!r}); a classifier needs at least two"
        )
    return classes


def load_labelled_pixels(
    ctx: AppContext,
    *,
    collection: CollectionRecord,
    arch: ClassifierArch,
    classes: list[str],
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The labelled images as the arch's uint8 training arrays: (pixels (n, ...), labels (n,)
    int64 indices into ``classes``, how many unlabelled images were left out)."""
    index = {name: i for i, name in enumerate(classes)}
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    seen = skipped = 0
    total = collection_size(ctx, collection.id)
    for _, images, metas in iter_collection_images(ctx, collection_id=collection.id):
        for image, meta in zip(images, metas, strict=True):
            label = _label(meta)
            if label in index:
                arrays.append(arch.prepare(image))
                labels.append(index[label])
            else:  # unlabelled (or labelled since check_labels ran): embedded, not trained on
                skipped += 1
        seen += len(images)
        if progress:
            progress(seen, total)
    return np.stack(arrays), np.asarray(labels, dtype=np.int64), skipped


def train_classifier(
    ctx: AppContext,
    *,
    collection: str,
    arch: str = "lenet5",
    epochs: int | None = None,
    seed: int = 0,
    dim: int | None = None,
    activate: bool = True,
    select: bool = False,
    load_progress: Progress | None = None,
    train_progress: Callable[[int, int, int, float], None] | None = None,
    embed_progress: Progress | None = None,
) -> CheckpointRecord:
    """Train ``arch`` on the collection's labelled images, record the checkpoint and (by
    default) make its embedder the collection's: codes recomputed, index rebuilt.

    Images without a ``label`` are left out of training (and still embedded on activation);
    a collection with fewer than two labels is refused with InvalidRequest. ``dim`` (the code's
    dimensions) applies to archs on codes (``head``: a pretrained CNN collection only).
    ``select`` (archs on codes): the head trains without a held-out part of the labels and is
    activated only when it beats the served codes there (``app.learning.head_selection``); the
    table goes to ``metrics["selection"]``. Pixel archs are candidates of ``cbir train cdae``.
    """
    try:
        spec = get_arch(arch)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if dim is not None and (not spec.on_codes or dim < 1):
        raise InvalidRequest(
            f"--dim applies to an arch on pretrained codes (a positive count), not {spec.name!r}"
            if not spec.on_codes
            else f"--dim must be positive, got {dim}"
        )
    with ctx.db.session() as session:
        record = require_collection(session, collection)
    computed: tuple[np.ndarray, np.ndarray] | None = None
    summary: dict[str, Any] | None = None  # the head's held-out check (select=True)
    if spec.on_codes:
        base_spec = pretrained_base(ctx, collection=record, arch=spec)
        classes = check_labels(ctx, collection=record)
        base_version, codes, ids, labels, unlabelled = load_labelled_codes(
            ctx, collection=record, base_spec=base_spec, classes=classes, progress=load_progress
        )
        labelled = labels >= 0
        if unlabelled:
            log.warning("%s: %d images have no label and are left out of training", collection, unlabelled)
        split, reason, served = None, "", None
        if select:
            split = head_split(labels, seed=seed)
            reason = too_few_labels()
            if split is not None:
                served = served_codes(ctx, record=record, ids=ids)
                if served[0] is None:
                    split = None
                    reason = "not validated: some labelled images have no served code (index them first)"
        train_rows = np.flatnonzero(labelled) if split is None else split.database
        result = spec.train(
            codes[train_rows],
            labels[train_rows],
            classes=classes,
            base_spec=base_spec,
            base_version=base_version,
            dim=dim,
            epochs=epochs,
            seed=seed,
            device=ctx.device,
            progress=train_progress,
        )
        computed = (result.project(codes), ids)  # type: ignore[attr-defined]
        trained = len(train_rows)
        if select:
            head_fit = {
                "epochs": len(result.metrics.get("epoch_losses", [])),
                "images": trained,
                "seconds": sum(result.metrics.get("epoch_seconds", [])),
            }
            if split is None or served is None or served[0] is None:
                summary = unvalidated(
                    reason=reason,
                    head_fit=head_fit,
                    served_version=record.embedder_version,
                    activate=activate,
                )
            else:
                summary = compare(
                    served=served[0],
                    described=served[1],
                    head=computed[0],
                    labels=labels,
                    split=split,
                    head_fit=head_fit,
                    served_version=record.embedder_version,
                    activate=activate,
                )
                activate = bool(summary["activated"])
    else:
        classes = check_labels(ctx, collection=record)
        pixels, labels, unlabelled = load_labelled_pixels(
            ctx, collection=record, arch=spec, classes=classes, progress=load_progress
        )
        if unlabelled:
            log.warning("%s: %d images have no label and are left out of training", collection, unlabelled)
        result = spec.train(
            pixels,
            labels,
            classes=classes,
            epochs=epochs,
            seed=seed,
            device=ctx.device,
            progress=train_progress,
        )
        trained = int(len(pixels))
    # Unique even for two trainings in the same second (the file is never overwritten).
    stamp = f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    relative = f"checkpoints/{spec.embedder}-{collection}-{spec.preset}-{stamp}.pt"
    sha = result.save(
        ctx.settings.data_dir / relative,
        dataset={"collection": collection, "images": trained, "unlabelled": unlabelled},
    )
    epochs_run = len(result.metrics.get("epoch_losses", []))
    with ctx.db.transaction() as session:
        checkpoint = CheckpointRecord(
            collection_id=record.id,
            embedder=spec.embedder,
            version=f"{spec.embedder}-{sha[:12]}",
            sha256=sha,
            path=relative,
            config={
                **result.recipe,
                "arch": spec.name,
                "preset": spec.preset,
                "epochs": epochs_run,
                "seed": seed,
                "classes": list(result.classes),
                "images": trained,
            },
            metrics=result.metrics,
        )
        session.add(checkpoint)
        if summary is not None:
            session.flush()  # the id, for the head's row
            summary["table"][-1]["checkpoint_id"] = checkpoint.id
            checkpoint.metrics = {**result.metrics, "selection": summary}
    if summary is not None:
        log.info("%s: head selection: %s (%s)", collection, summary["winner"], summary["reason"])
    if activate:
        activate_checkpoint(
            ctx,
            collection=collection,
            checkpoint_id=checkpoint.id,
            progress=embed_progress,
            computed=computed,
        )
    return checkpoint


def pretrained_base(ctx: AppContext, *, collection: CollectionRecord, arch: ClassifierArch) -> str:
    """The pretrained CNN spec whose codes an arch on codes trains on: the collection's embedder,
    or, for a collection already serving that arch's embedder, the base its checkpoint records."""
    if collection.embedder == arch.embedder and collection.checkpoint_id is not None:
        with ctx.db.session() as session:
            active = session.get(CheckpointRecord, collection.checkpoint_id)
        base = (active.config or {}).get("base") if active is not None else None
        if base:
            return str(base)
    if not registry.get_spec(collection.embedder).pretrained:
        raise InvalidRequest(
            f"collection {collection.name!r} uses embedder {collection.embedder!r}; --arch {arch.name} "
            "trains a head on a pretrained CNN's codes: use it on a collection whose embedder is a "
            "pretrained CNN (e.g. efficientnet_lite0)"
        )
    return collection.embedder


def load_labelled_codes(
    ctx: AppContext,
    *,
    collection: CollectionRecord,
    base_spec: str,
    classes: list[str],
    progress: Progress | None = None,
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, int]:
    """Every image's pretrained code: (base version, codes (n, d) float32, ids (n,), labels (n,)
    int64 indices into ``classes``, -1 for unlabelled, how many are unlabelled).

    The collection's stored vectors are used when they are the base embedder's raw codes (same
    version) for every image; otherwise the collection is embedded with the base embedder."""
    base = ctx.embedders.get(base_spec)
    codes, ids = load_vectors(ctx.db, collection_id=collection.id, embedder_version=base.version)
    if len(ids) != collection_size(ctx, collection.id):
        codes, ids = embed_collection(ctx, collection=collection, embedder=base, progress=progress)
    elif progress:
        progress(len(ids), len(ids))
    with ctx.db.session() as session:
        metas: dict[int, dict[str, Any] | None] = dict(
            session.execute(
                select(ImageRecord.id, ImageRecord.meta).where(ImageRecord.collection_id == collection.id)
            ).all()
        )
    index = {name: i for i, name in enumerate(classes)}
    labels = np.asarray([index.get(_label(metas.get(int(i))), -1) for i in ids], dtype=np.int64)
    return base.version, np.ascontiguousarray(codes, dtype=np.float32), ids, labels, int((labels < 0).sum())
