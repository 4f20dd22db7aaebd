"""Train a collection's embedder by selection: candidates measured on its held-out labels.

What ``cbir train cdae`` and the demo run. The collection's images and ``label`` metadata go to
``app.learning.candidates.select_embedder`` (the protocol is there and in docs/selection.md);
every learned model it trained is recorded as a checkpoint, the winner is recorded (an untrained
baseline as a projection of the pixels embedder's codes, servable like a PCA-whitening) with the
selection's table in ``metrics["selection"]``, and activated.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import InvalidRequest
from app.data.records import CheckpointRecord, CollectionRecord, utcnow
from app.embedding.whitened import save_whitening, whitened_version
from app.learning.candidates import IMAGE_SIZE, Fitted, Selection, TrainBars, select_embedder
from app.learning.training import (
    Progress,
    activate_checkpoint,
    check_trainable,
    collection_size,
    iter_collection_images,
)
from index.rerank import Whitening
from models import cdae

log = logging.getLogger(__name__)

SCREEN_IMAGES = 5000  # learned candidates are screened on this many images ...
SCREEN_EPOCHS = 2  # ... for this many epochs: about a minute each on 2 CPU cores for MNIST
# The demo's time plan (about 10 minutes on 2 CPU cores): the winner's full training gets this
# many seconds, its recipe's epochs cut to what the rate measured while screening allows.
DEMO_FULL_BUDGET_S = 240.0


@dataclass
class SelectionOutcome:
    checkpoint: CheckpointRecord  # the winner's, active unless activate=False
    selection: Selection
    checkpoints: dict[int, str]  # every checkpoint recorded: id -> candidate name (stage)


def _label(meta: dict[str, Any] | None) -> str:
    value = (meta or {}).get("label")
    return "" if value is None else str(value).strip()


def load_images_and_labels(
    ctx: AppContext, *, collection: CollectionRecord, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(uint8 (n, 28, 28) greyscale as the 28x28 embedders see them, int64 labels (n,) indices into
    the class names, -1 for unlabelled, int64 ids (n,), the class names sorted)."""
    total = collection_size(ctx, collection.id)
    arrays: list[np.ndarray] = []
    names: list[str] = []
    ids: list[int] = []
    size = (IMAGE_SIZE, IMAGE_SIZE)
    for batch_ids, images, metas in iter_collection_images(ctx, collection_id=collection.id):
        for image, meta in zip(images, metas, strict=True):
            grey = image.convert("L")
            if grey.size != size:
                grey = grey.resize(size, Image.Resampling.BILINEAR)
            arrays.append(np.array(grey, dtype=np.uint8))
            names.append(_label(meta))
        ids.extend(batch_ids)
        if progress:
            progress(len(arrays), total)
    classes = sorted(set(names) - {""})
    index = {name: i for i, name in enumerate(classes)}
    labels = np.asarray([index.get(name, -1) for name in names], dtype=np.int64)
    pixels = np.stack(arrays) if arrays else np.zeros((0, *size), np.uint8)
    return pixels, labels, np.asarray(ids, dtype=np.int64), classes


def select_and_train(
    ctx: AppContext,
    *,
    collection: str,
    epochs: int | None = None,
    seed: int = 0,
    activate: bool = True,
    screen_images: int = SCREEN_IMAGES,
    screen_epochs: int = SCREEN_EPOCHS,
    full_budget_s: float | None = None,
    load_progress: Progress | None = None,
    train_bars: TrainBars | None = None,
    embed_progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> SelectionOutcome:
    """Select, record and (by default) activate the collection's embedder.

    ``epochs``: the winner's full training (None: its recipe's, cut to ``full_budget_s`` when
    given). With fewer than two labels of
    ten images or more, the default CDAE is trained on every image, marked not validated."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
    check_trainable(ctx, record=record)
    images, labels, ids, classes = load_images_and_labels(ctx, collection=record, progress=load_progress)
    if len(images) == 0:
        raise InvalidRequest(f"collection {collection!r} has no images to train on")
    selection = select_embedder(
        images,
        labels if classes else None,
        screen_images=screen_images,
        screen_epochs=screen_epochs,
        full_epochs=epochs,
        full_budget_s=full_budget_s,
        seed=seed,
        device=ctx.device,
        progress=say,
        train_bars=train_bars,
    )
    dataset = {"collection": collection, "images": int(len(images)), "image_size": IMAGE_SIZE}
    recorded: dict[int, str] = {}
    for fitted in selection.kept:
        if fitted is selection.model:
            continue
        checkpoint = _record(ctx, record=record, fitted=fitted, dataset=dataset, classes=classes)
        recorded[checkpoint.id] = f"{fitted.name} ({_stage(fitted)})"
    summary = selection.summary()  # after the kept rows got their checkpoint ids
    winner = _record(
        ctx, record=record, fitted=selection.model, dataset=dataset, classes=classes, summary=summary
    )
    recorded[winner.id] = f"{selection.model.name} ({_stage(selection.model)})"
    if activate:
        # The codes of every stored image are computed here from the same pixels the served
        # embedder prepares, so the collection is not decoded a second time.
        vectors = _encode_all(selection, images=images, progress=embed_progress)
        activate_checkpoint(ctx, collection=collection, checkpoint_id=winner.id, computed=(vectors, ids))
    return SelectionOutcome(checkpoint=winner, selection=selection, checkpoints=recorded)


def format_table(summary: dict[str, Any]) -> str:
    """The selection as a plain-text table (what `cbir train cdae` and `cbir demo` print)."""

    def figure(value: object) -> str:
        return "-" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]

    lines = [
        ("validated: " if summary["validated"] else "") + f"{summary['reason']}",
        f"{'candidate':<14} {'stage':<9} {'P@10':>6} {'mAP@all':>8} {'epochs':>6} {'images':>7} "
        f"{'seconds':>8}  checkpoint",
    ]
    for row in summary["table"]:
        lines.append(
            f"{row['name']:<14} {row['stage']:<9} {figure(row['p_at_10']):>6} {figure(row['map_all']):>8} "
            f"{row['epochs']:>6} {row['images']:>7} {row['seconds']:>8}  {row.get('checkpoint_id') or '-'}"
            + ("  <- chosen" if row["chosen"] else "")
        )
    return "\n".join(lines)


def _stage(fitted: Fitted) -> str:
    return str((fitted.row or {}).get("stage", "full"))


def _encode_all(selection: Selection, *, images: np.ndarray, progress: Progress | None) -> np.ndarray:
    chunks = []
    for start in range(0, len(images), 4096):
        chunks.append(selection.encode(images[start : start + 4096]))
        if progress:
            progress(min(start + 4096, len(images)), len(images))
    return np.concatenate(chunks)


def _record(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    fitted: Fitted,
    dataset: dict[str, Any],
    classes: list[str],
    summary: dict[str, Any] | None = None,
) -> CheckpointRecord:
    """Write a fitted candidate's file and its checkpoint row; its table row gets the id."""
    stamp = f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    relative = f"checkpoints/{fitted.name}-{record.name}-{_stage(fitted)}-{stamp}"
    held_out = {k: (fitted.row or {}).get(k) for k in ("stage", "p_at_10", "map_all")}
    metrics: dict[str, Any] = {"held_out": held_out}
    if fitted.kind == "baseline":
        embedder, version, sha, relative, config = _record_projection(ctx, fitted=fitted, relative=relative)
    else:
        relative += ".pt"
        result = fitted.artefact
        if fitted.kind == "unsupervised":
            embedder = "cdae"
            sha = cdae.save_checkpoint(
                ctx.settings.data_dir / relative, result=result, config=result.model.config, dataset=dataset
            )
        else:
            embedder = str(fitted.config.get("arch", fitted.name))
            # trained on label values (indices into ``classes``): its file and row name the labels
            result.classes = [classes[int(c)] for c in result.classes]
            sha = result.save(ctx.settings.data_dir / relative, dataset=dataset)
        version = f"{embedder}-{sha[:12]}"
        config = {**fitted.config, "epochs": fitted.epochs, "images": fitted.images}  # epochs run
        if fitted.kind == "supervised":
            config["classes"] = list(result.classes)
        metrics.update({k: v for k, v in (getattr(result, "metrics", None) or {}).items()})
        if fitted.kind == "unsupervised":
            metrics["epoch_losses"] = [float(x) for x in result.losses]
            metrics["epoch_seconds"] = [float(x) for x in result.epoch_seconds]
    config["selected_by"] = "selection"  # this collection may switch between the candidates' embedders
    with ctx.db.transaction() as session:
        checkpoint = CheckpointRecord(
            collection_id=record.id,
            embedder=embedder,
            version=version,
            sha256=sha,
            path=relative,
            config=config,
            metrics=metrics,
        )
        session.add(checkpoint)
        session.flush()  # the id, for the table
        if fitted.row is not None:
            fitted.row["checkpoint_id"] = checkpoint.id
        if summary is not None:  # its table holds the rows themselves: copied once all have ids
            checkpoint.metrics = {**metrics, "selection": copy.deepcopy(summary)}
    log.info("%s: recorded %s as checkpoint %d", record.name, fitted.name, checkpoint.id)
    return checkpoint


def _record_projection(
    ctx: AppContext, *, fitted: Fitted, relative: str
) -> tuple[str, str, str, str, dict[str, Any]]:
    """An untrained winner as a projection of the ``pixels`` embedder's codes (identity for raw
    pixels, the PCA basis for PCA), served through the whitening path of the embedder cache."""
    base = ctx.embedders.get("pixels")
    if isinstance(fitted.artefact, Whitening):
        projection = fitted.artefact
    else:  # raw pixels: mean 0, identity, so the codes are exactly the pixels embedder's
        projection = Whitening(np.zeros(base.dim, np.float32), np.eye(base.dim, dtype=np.float32))
    relative += ".npz"
    sha = save_whitening(
        ctx.settings.data_dir / relative,
        whitening=projection,
        base_version=base.version,
        fit_id=uuid.uuid4().hex,
    )
    version = whitened_version(base.version, dim=projection.dim, sha256=sha)
    config = {
        "kind": "whitening",  # how the embedder cache serves it: pixels, then the projection
        "selected": fitted.name,
        "components": projection.dim,
        "base_version": base.version,
        **fitted.config,
    }
    return "pixels", version, sha, relative, config
