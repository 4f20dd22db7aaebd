"""Per-collection retrieval tuning: PCA-whitening of pretrained codes and query expansion."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from app.context import AppContext
from app.errors import InvalidRequest
from app.indexes import load_vectors
from app.records import CheckpointRecord, CollectionRecord
from app.services import evaluation
from app.services import groundtruth as gt
from app.services.collections import checkpoint_of, require_collection
from app.services.training import Progress, activate_checkpoint, embed_collection
from index.rerank import DEFAULT_SHRINKAGE, fit_whitening
from models import registry
from models.whitened import save_whitening, whitened_version

MAX_QE = 20
# Beyond this many codes the covariance is estimated on an evenly spaced sample.
WHITENING_SAMPLE = 200_000


@dataclass(frozen=True)
class SearchOptions:
    qe: int = 0  # alpha-QE depth: 0 is off
    qe_alpha: float = 3.0

    @classmethod
    def of(cls, record: CollectionRecord) -> SearchOptions:
        raw = record.search_options or {}
        return cls(qe=int(raw.get("qe", 0)), qe_alpha=float(raw.get("qe_alpha", 3.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"qe": self.qe, "qe_alpha": self.qe_alpha}


def check_qe(qe: int, qe_alpha: float) -> None:
    if not 0 <= qe <= MAX_QE:
        raise InvalidRequest(f"qe must be between 0 (off) and {MAX_QE}, got {qe}")
    if not 0.0 <= qe_alpha <= 10.0:
        raise InvalidRequest(f"qe_alpha must be between 0 and 10, got {qe_alpha}")


def set_search_options(ctx: AppContext, *, collection: str, qe: int, qe_alpha: float) -> SearchOptions:
    check_qe(qe, qe_alpha)
    options = SearchOptions(qe=qe, qe_alpha=qe_alpha)
    with ctx.db.transaction() as session:
        record = require_collection(session, collection)
        record.search_options = options.to_dict()
    return options


def whiten_collection(
    ctx: AppContext,
    *,
    collection: str,
    dim: int,
    shrinkage: float = DEFAULT_SHRINKAGE,
    progress: Progress | None = None,
) -> CheckpointRecord:
    """Fit a PCA-whitening to ``dim`` dims on the collection's own codes, record it as a checkpoint
    and serve it (the index is rebuilt from the whitened codes; queries are whitened the same way)."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
    if registry.get_spec(record.embedder).trainable:
        raise InvalidRequest(
            f"whitening applies to pretrained embedders; {record.embedder!r} is trained on the collection"
        )
    if not 0.0 <= shrinkage <= 1.0:
        raise InvalidRequest(f"shrinkage must be between 0 and 1, got {shrinkage}")
    base = ctx.embedders.get(record.embedder)
    if checkpoint is None and record.embedder_version == base.version:
        raw, ids = load_vectors(ctx.db, collection_id=record.id, embedder_version=base.version)
    else:  # the served codes are whitened already: start again from the network's own
        raw, ids = embed_collection(ctx, collection=record, embedder=base, progress=progress)
    if not 1 <= dim <= min(len(raw), base.dim):
        raise InvalidRequest(
            f"whitening to {dim} dims needs at least {dim} images and {dim}-d codes "
            f"(the collection has {len(raw)} images of {base.dim} dims)"
        )
    sample = raw[:: max(1, len(raw) // WHITENING_SAMPLE)]
    whitening = fit_whitening(sample, dim=dim, shrinkage=shrinkage)
    fit_id = uuid.uuid4().hex
    relative = f"checkpoints/whiten-{record.name}-{dim}-{fit_id[:8]}.npz"
    sha = save_whitening(
        ctx.settings.data_dir / relative, whitening=whitening, base_version=base.version, fit_id=fit_id
    )
    with ctx.db.transaction() as session:
        saved = CheckpointRecord(
            collection_id=record.id,
            embedder=record.embedder,
            version=whitened_version(base.version, dim=dim, sha256=sha),
            sha256=sha,
            path=relative,
            config={"kind": "whitening", "dim": dim, "shrinkage": shrinkage, "base_version": base.version},
            metrics={"images": len(sample)},
        )
        session.add(saved)
        session.flush()
        checkpoint_id = saved.id
    activate_checkpoint(
        ctx, collection=collection, checkpoint_id=checkpoint_id, computed=(whitening.apply(raw), ids)
    )
    with ctx.db.session() as session:
        stored = session.get(CheckpointRecord, checkpoint_id)
        assert stored is not None
        session.expunge(stored)
    return stored


def evaluate_request(
    ctx: AppContext,
    *,
    collection: str,
    queries: str | None,
    groundtruth: dict[str, list[str]] | None,
    embedders: tuple[str, ...],
    whiten: tuple[int, ...],
    qe: tuple[int, ...],
    qe_alpha: float | None,
    limit: int | None,
) -> list[dict[str, Any]]:
    """What `cbir eval` does, for the API: ground truth or a labelled query set, not both."""
    if (queries is None) == (groundtruth is None):
        raise InvalidRequest("give either queries (a labelled query set) or groundtruth, not both")
    if groundtruth is not None:
        return gt.evaluate_with_groundtruth(
            ctx,
            collection=collection,
            groundtruth=gt.check_groundtruth(groundtruth),
            embedders=embedders,
            whiten=whiten or (0,),
            qe=qe,
            qe_alpha=qe_alpha,
        )
    if any(whiten) or any(qe):
        raise InvalidRequest("whiten and qe are evaluated with a groundtruth")
    assert queries is not None
    return evaluation.evaluate(ctx, collection=collection, queries=queries, compare=embedders, limit=limit)
