"""Per-collection retrieval tuning: PCA-whitening of pretrained codes and query expansion."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from app.catalog.collections import checkpoint_of, require_collection
from app.context import AppContext
from app.core.cancel import NEVER, CancelToken, checking
from app.core.errors import InvalidRequest
from app.data.records import CheckpointRecord, CollectionRecord
from app.data.vector_rows import load_vectors
from app.embedding import cost
from app.embedding.whitened import save_whitening, whitened_version
from app.learning.training import Progress, activate_checkpoint, collection_size, embed_collection
from app.search.options import SearchOptions
from index.rerank import DEFAULT_SHRINKAGE, fit_whitening
from models import registry
from models.base import Embedder

MAX_QE = 20
# Beyond this many codes the covariance is estimated on an evenly spaced sample.
WHITENING_SAMPLE = 200_000


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
        # other keys (the automatic tuning's switch and record) stay; a hand-set QE is never
        # overridden by the automatic tuning
        record.search_options = {**(record.search_options or {}), **options.to_dict(), "qe_by_hand": True}
    return options


def whiten_collection(
    ctx: AppContext,
    *,
    collection: str,
    dim: int,
    shrinkage: float = DEFAULT_SHRINKAGE,
    progress: Progress | None = None,
    token: CancelToken = NEVER,
) -> CheckpointRecord:
    """Fit a PCA-whitening to ``dim`` dims on the collection's own codes, record it as a checkpoint
    and serve it (the index is rebuilt from the whitened codes; queries are whitened the same way).

    ``token`` is checked between the steps (and between batches of a re-embedding); Cancelled
    before anything is stored, never after: its last check comes before the checkpoint is saved."""
    record, checkpoint, base = _whitening_base(ctx, collection=collection, shrinkage=shrinkage)
    token.check()
    raw, ids = network_codes(
        ctx, record=record, checkpoint=checkpoint, base=base, progress=progress, token=token
    )
    if not 1 <= dim <= min(len(raw), base.dim):
        raise InvalidRequest(
            f"whitening to {dim} dims needs at least {dim} images and {dim}-d codes "
            f"(the collection has {len(raw)} images of {base.dim} dims)"
        )
    token.check()
    return serve_whitening(
        ctx, record=record, base=base, codes=(raw, ids), dim=dim, shrinkage=shrinkage, token=token
    )


def network_codes(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    checkpoint: CheckpointRecord | None,
    base: Embedder,
    progress: Progress | None = None,
    token: CancelToken = NEVER,
) -> tuple[np.ndarray, np.ndarray]:
    """The pretrained network's own codes of every image ((n, d) float32 unit rows, (n,) int64 ids):
    the stored ones while they are served, else computed afresh (the served ones are whitened)."""
    if checkpoint is None and record.embedder_version == base.version:
        return load_vectors(ctx.db, collection_id=record.id, embedder_version=base.version)
    each = cost.per_image(ctx, embedder=base, collection_id=record.id, measure=False).seconds
    return embed_collection(
        ctx,
        collection=record,
        embedder=base,
        progress=checking(progress, token),
        batch_size=cost.batch_size(each, largest=ctx.settings.embed_batch_size),
    )


def serve_whitening(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    base: Embedder,
    codes: tuple[np.ndarray, np.ndarray],
    dim: int,
    shrinkage: float = DEFAULT_SHRINKAGE,
    token: CancelToken = NEVER,
) -> CheckpointRecord:
    """Fit a whitening on the network's ``codes`` (vectors, ids), store it as a checkpoint and serve
    it: the index is rebuilt from the whitened codes, and queries are whitened the same way."""
    raw, ids = codes
    sample = raw[:: max(1, len(raw) // WHITENING_SAMPLE)]
    whitening = fit_whitening(sample, dim=dim, shrinkage=shrinkage)
    token.settle()  # from here on the fit is stored and served: a cancel is refused (409)
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
        ctx, collection=record.name, checkpoint_id=checkpoint_id, computed=(whitening.apply(raw), ids)
    )
    with ctx.db.session() as session:
        stored = session.get(CheckpointRecord, checkpoint_id)
        assert stored is not None
        session.expunge(stored)
    return stored


def _whitening_base(
    ctx: AppContext, *, collection: str, shrinkage: float
) -> tuple[CollectionRecord, CheckpointRecord | None, Embedder]:
    """The collection, its checkpoint and the network whose codes are whitened (422 when none)."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
    if registry.get_spec(record.embedder).trainable:
        raise InvalidRequest(
            f"whitening applies to pretrained embedders; {record.embedder!r} is trained on the collection"
        )
    if not 0.0 <= shrinkage <= 1.0:
        raise InvalidRequest(f"shrinkage must be between 0 and 1, got {shrinkage}")
    return record, checkpoint, ctx.embedders.get(record.embedder)


def whitening_cost(ctx: AppContext, *, collection: str, dim: int, shrinkage: float) -> cost.Estimate:
    """The estimated seconds of ``whiten_collection``: re-embedding when the served codes are
    whitened already, the fit, storing and indexing the whitened codes; 422 over_budget beyond
    CBIR_JOB_COST_BUDGET_S."""
    record, checkpoint, base = _whitening_base(ctx, collection=collection, shrinkage=shrinkage)
    images = collection_size(ctx, record.id)
    reembed = not (checkpoint is None and record.embedder_version == base.version)
    fitted = min(images, WHITENING_SAMPLE)

    def build(measure: bool) -> cost.Estimate:
        read = (
            cost.embedding(ctx, embedder=base, collection_id=record.id, images=images, measure=measure)
            if reembed
            else cost.plain(images * cost.ROW_READ_S)
        )
        fit = cost.plain((fitted * base.dim * base.dim + 4 * base.dim**3) * cost.FLOP_S)
        return (
            read
            + fit
            + cost.plain(images * cost.ROW_WRITE_S, f"{images:,} whitened codes stored and indexed")
        )

    settings = ctx.settings
    found = cost.estimate(build, budget=min(settings.sync_cost_budget_s, settings.job_cost_budget_s))
    if found.seconds > settings.job_cost_budget_s:
        raise cost.over(
            f"whitening {record.name!r}",
            found,
            budget=settings.job_cost_budget_s,
            setting=cost.JOB,
            cheaper="whiten while the collection serves its network's own codes (nothing to re-embed)",
        )
    return found


def whitening_job(
    ctx: AppContext, *, collection: str, dim: int, shrinkage: float, token: CancelToken
) -> dict[str, Any]:
    """``whiten_collection`` as a job's work: stops at the next step once ``token`` is set."""
    saved = whiten_collection(ctx, collection=collection, dim=dim, shrinkage=shrinkage, token=token)
    return {"collection": collection, "checkpoint_id": saved.id, "version": saved.version}
