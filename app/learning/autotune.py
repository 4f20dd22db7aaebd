"""Automatic search tuning of pretrained-CNN collections: PCA-whitening and query expansion, each
switched on only where it was measured better (the figures are in docs/photos.md).

- Whitening (128 dims, shrinkage 0.5, fitted on the collection's own codes) is fitted once the
  collection has ``CBIR_AUTOTUNE_MIN_IMAGES`` images (300: from there on it helped in every draw
  of Holidays collections), and fitted again once the collection has doubled since.
- Query expansion (alpha-QE, depth 2) stays off without a validation: on Holidays it moved mAP by
  less than 0.003, which is not a measured win.
- With a validation (images with a ``label``, queries those with ``role`` query if any; or a
  ground-truth file), plain, whitened and whitened + QE codes are compared with the metric of
  ``cbir eval --groundtruth``, and each step is kept only if it raises mAP.

The decision and its table are kept in the collection's ``search_options`` (``tuning``; the
switch is ``autotune``) and shown by ``GET /collections/{name}`` and ``cbir collections tune``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from app.catalog.collections import checkpoint_of, require_collection
from app.context import AppContext
from app.core.errors import InvalidRequest
from app.data.records import CollectionRecord, ImageRecord, utcnow
from app.learning import reembed
from app.learning.groundtruth import match_groundtruth, rank_scores
from app.learning.training import collection_size, replace_version
from app.learning.tuning import WHITENING_SAMPLE, network_codes, serve_whitening
from index.metrics import evaluate_groundtruth
from index.rerank import DEFAULT_SHRINKAGE, fit_whitening
from models import registry

log = logging.getLogger(__name__)

WHITEN_DIM = 128
REFIT_GROWTH = 2  # fit again once the collection has this many times the images of the last fit
QE_DEPTH = 2
QE_ALPHA = 3.0
MIN_QUERIES = 5  # fewer labelled queries (with a relevant image) are no validation
# Queries evaluated at most (evenly spaced): the (queries, images) score matrix stays small.
MAX_QUERIES = 500


@dataclass(frozen=True)
class Validation:
    """Queries with known relevant images, over entries that map to rows of the codes."""

    source: str  # "labels" or "groundtruth"
    rows: np.ndarray  # (e,) int64: entry -> row of the codes
    queries: np.ndarray  # (q,) int64 entries
    relevant: list[np.ndarray]  # per query, its relevant entries (-1: one that is missing)


@dataclass(frozen=True)
class Decision:
    whitening: bool
    qe: bool
    table: list[dict[str, Any]]
    reasons: dict[str, str]


def measure(codes: np.ndarray, *, validation: Validation, qe: int = 0) -> dict[str, float]:
    """mAP over the full ranking and P@10 of the validation's queries on ``codes`` (unit rows)."""
    scores = rank_scores(codes[validation.rows], queries=validation.queries, qe=qe, qe_alpha=QE_ALPHA)
    found = evaluate_groundtruth(scores=scores, relevant=validation.relevant, k=10)
    return {"map_all": round(float(found["map_all"]), 4), "p_at_10": round(float(found["p_at_10"]), 4)}


def decide(raw: np.ndarray, *, validation: Validation | None, dim: int) -> Decision:
    """Which steps to serve for these network codes ((n, d) float32 unit rows).

    Without a validation: whitening on (the caller checked the collection is big enough), QE off.
    With one: each step is kept only if it raises mAP over what is served without it."""
    if validation is None:
        return Decision(
            whitening=True,
            qe=False,
            table=[],
            reasons={
                "whitening": "on: enough images (not validated: no labels or ground truth)",
                "qe": "off: not measured better without labels or ground truth",
            },
        )
    sample = raw[:: max(1, len(raw) // WHITENING_SAMPLE)]
    whitened = fit_whitening(sample, dim=dim, shrinkage=DEFAULT_SHRINKAGE).apply(raw)
    plain = measure(raw, validation=validation)
    white = measure(whitened, validation=validation)
    keep_white = white["map_all"] > plain["map_all"]
    served, before = (whitened, white) if keep_white else (raw, plain)
    expanded = measure(served, validation=validation, qe=QE_DEPTH)
    keep_qe = expanded["map_all"] > before["map_all"]
    base = f"whiten{dim}" if keep_white else "plain"
    table = [
        {"setting": "plain", "whiten": 0, "qe": 0, **plain},
        {"setting": f"whiten{dim}", "whiten": dim, "qe": 0, **white},
        {"setting": f"{base}+qe{QE_DEPTH}", "whiten": dim if keep_white else 0, "qe": QE_DEPTH, **expanded},
    ]
    return Decision(
        whitening=keep_white,
        qe=keep_qe,
        table=table,
        reasons={
            "whitening": f"{'on' if keep_white else 'off'}: mAP {white['map_all']:.4f} whitened vs "
            f"{plain['map_all']:.4f} plain",
            "qe": f"{'on' if keep_qe else 'off'}: mAP {expanded['map_all']:.4f} with QE {QE_DEPTH} vs "
            f"{before['map_all']:.4f} without",
        },
    )


def label_validation(ctx: AppContext, *, collection_id: int, ids: np.ndarray) -> Validation | None:
    """Same label = relevant; queries: the images whose ``role`` is query if any, else every labelled
    image (itself never counted); None when fewer than MIN_QUERIES queries have a relevant image."""
    with ctx.db.session() as session:
        metas: dict[int, Any] = dict(
            session.execute(
                select(ImageRecord.id, ImageRecord.meta).where(ImageRecord.collection_id == collection_id)
            ).all()
        )
    labels = [str((metas.get(int(i)) or {}).get("label") or "").strip() for i in ids]
    roles = [str((metas.get(int(i)) or {}).get("role") or "") for i in ids]
    by_label: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        if label:
            by_label.setdefault(label, []).append(row)
    with_role = [r for r, role in enumerate(roles) if role == "query" and labels[r]]
    candidates = with_role or [r for r, label in enumerate(labels) if label]
    queries, relevant = [], []
    for row in candidates:
        others = [r for r in by_label[labels[row]] if r != row]
        if others:
            queries.append(row)
            relevant.append(np.asarray(others, dtype=np.int64))
    if len(queries) < MIN_QUERIES:
        return None
    step = max(1, len(queries) // MAX_QUERIES)
    queries, relevant = queries[::step], relevant[::step]
    return Validation("labels", np.arange(len(ids), dtype=np.int64), np.asarray(queries, np.int64), relevant)


def groundtruth_validation(
    ctx: AppContext, *, collection_id: int, ids: np.ndarray, groundtruth: dict[str, list[str]]
) -> Validation:
    truth = match_groundtruth(ctx, collection_id=collection_id, ids=ids, data=groundtruth)
    return Validation("groundtruth", truth.rows, truth.queries, truth.relevant)


def set_autotune(ctx: AppContext, *, collection: str, on: bool) -> None:
    """Switch the automatic tuning on or off; what is served now stays until the next tuning."""
    with ctx.db.transaction() as session:
        record = require_collection(session, collection)
        record.search_options = {**(record.search_options or {}), "autotune": on}


def after_import_logged(ctx: AppContext, *, collection: str) -> None:
    """``after_import`` for the end of an import job: a failure is logged and leaves the imported
    images served as they are (the import itself succeeded)."""
    try:
        after_import(ctx, collection=collection)
    except Exception:
        log.exception("automatic tuning of %s failed; its search stays as it was", collection)


def after_import(ctx: AppContext, *, collection: str) -> dict[str, Any] | None:
    """The policy run at the end of an import: tune when the collection reached the threshold or
    has doubled since the last tuning, never when switched off or for a trained embedder."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
    options = record.search_options or {}
    if not registry.get_spec(record.embedder).pretrained or options.get("autotune", True) is False:
        return None
    images = collection_size(ctx, record.id)
    if images < ctx.settings.autotune_min_images:
        return None
    stored = options.get("tuning")
    last: dict[str, Any] = stored if isinstance(stored, dict) else {}
    base = ctx.embedders.get(record.embedder)
    fitted = last.get("fitted_on") if last.get("base_version") == base.version else None
    if fitted and images < REFIT_GROWTH * int(fitted):
        return None
    return tune_collection(ctx, collection=collection)


def tune_collection(
    ctx: AppContext, *, collection: str, groundtruth: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """Measure and serve the steps that help now (see the module docstring); returns the record."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
    if not registry.get_spec(record.embedder).pretrained:
        raise InvalidRequest(f"automatic tuning applies to pretrained CNN embedders, not {record.embedder!r}")
    base = ctx.embedders.get(record.embedder)
    raw, ids = network_codes(ctx, record=record, checkpoint=checkpoint, base=base)
    if len(raw) < 2:
        raise InvalidRequest(f"collection {collection!r} has {len(raw)} images: nothing to tune")
    dim = min(WHITEN_DIM, base.dim, len(raw))
    validation = (
        groundtruth_validation(ctx, collection_id=record.id, ids=ids, groundtruth=groundtruth)
        if groundtruth is not None
        else label_validation(ctx, collection_id=record.id, ids=ids)
    )
    decision = decide(raw, validation=validation, dim=dim)
    whitened = checkpoint is not None and (checkpoint.config or {}).get("kind") == "whitening"
    if decision.whitening:
        serve_whitening(ctx, record=record, base=base, codes=(raw, ids), dim=dim)
    elif whitened:
        _serve_network_codes(ctx, record=record, base=base, codes=(raw, ids))
    tuning: dict[str, Any] = {
        "applies": True,
        "state": "tuned",
        "validated": validation is not None,
        "validation": None
        if validation is None
        else {"source": validation.source, "queries": int(len(validation.queries))},
        "fitted_on": int(len(raw)),
        "base_version": base.version,
        "steps": [
            {
                "step": "whitening",
                "on": decision.whitening,
                "dim": dim,
                "shrinkage": DEFAULT_SHRINKAGE,
                "validated": validation is not None,
                "reason": decision.reasons["whitening"],
            },
            {
                "step": "qe",
                "on": decision.qe,
                "depth": QE_DEPTH,
                "alpha": QE_ALPHA,
                "validated": validation is not None,
                "reason": decision.reasons["qe"],
            },
        ],
        "table": decision.table,
        "tuned_at": utcnow().isoformat(),
    }
    with ctx.db.transaction() as session:
        live = require_collection(session, collection)
        # what the record describes: another embedder or a hand-made whitening later makes it stale
        tuning["served_version"] = live.embedder_version
        current = dict(live.search_options or {})
        if current.get("qe_by_hand"):  # `search-options` was set by hand: that choice stays
            qe_step = tuning["steps"][1]
            qe_step["on"] = int(current.get("qe", 0)) > 0
            by_hand = f"set by hand (qe {current.get('qe', 0)}), kept"
            qe_step["reason"] = f"{by_hand}; measured: {qe_step['reason']}"
            live.search_options = {**current, "tuning": tuning}
        else:
            live.search_options = {
                **current,
                "qe": QE_DEPTH if decision.qe else 0,
                "qe_alpha": QE_ALPHA,
                "tuning": tuning,
            }
    log.info("tuned %s: %s", collection, "; ".join(decision.reasons.values()))
    return tuning


def _serve_network_codes(
    ctx: AppContext, *, record: CollectionRecord, base: Any, codes: tuple[np.ndarray, np.ndarray]
) -> None:
    """Serve the network's own codes again (whitening measured worse): store them, then switch."""
    with ctx.write_lock, ctx.db.transaction() as session:
        replace_version(
            session, collection_id=record.id, embedder=record.embedder, version=base.version, codes=codes
        )
    reembed._switch(ctx, collection=record.name, spec=record.embedder, embedder=base)
