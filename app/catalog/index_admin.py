"""A collection's index as a resource: its status, its kind and search parameters, its recall."""

from __future__ import annotations

from typing import Any

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import BadIndexFactory, UnsupportedIndexKind
from app.data.records import CollectionRecord
from app.data.vector_rows import count_vectors, stored_dim
from app.indexing.manager import IndexStatus
from index.kinds import AUTO, check_ahead
from index.store import UnsupportedKind

KNOBS = ("ef_search", "nprobe", "k_factor")


def index_status(ctx: AppContext, name: str) -> IndexStatus:
    with ctx.db.session() as session:
        record = require_collection(session, name)
    return ctx.indexes.status(record)


def _stored(ctx: AppContext, record: CollectionRecord) -> tuple[int, int | None]:
    """How many vectors of its version the collection holds, and their dimension (None: none yet)."""
    if record.embedder_version is None:
        return 0, None
    version = record.embedder_version
    count = count_vectors(ctx.db, collection_id=record.id, embedder_version=version)
    return count, stored_dim(ctx.db, collection_id=record.id, embedder_version=version)


def configure_index(
    ctx: AppContext, *, name: str, factory: str | None, params: dict[str, Any]
) -> tuple[IndexStatus, bool]:
    """Set the collection's index kind (``auto`` or a FAISS factory string) and search parameters
    (``ef_search``, ``nprobe``, ``k_factor``; None clears one). A new kind is built in the
    background while the old index serves; returns (status, whether a rebuild started)."""
    with ctx.db.session() as session:
        record = require_collection(session, name)
    kind = None
    if factory is not None:
        if factory.strip().lower() == AUTO:
            kind = AUTO
        else:
            # Checked before it is stored: some strings FAISS parses abort the process when it
            # builds them, and a stored one would abort every start after. Without vectors yet,
            # what needs their dimension is checked at the build (a failure there serves Flat).
            n, dim = _stored(ctx, record)
            try:
                normalised = ctx.indexes.factory_checks.validate(factory, dim=dim)
                check_ahead(normalised, n=n)
            except ValueError as exc:
                raise BadIndexFactory(f"index factory: {exc}") from None
            try:
                ctx.indexes.check_kind(normalised, dim=dim)
            except UnsupportedKind as exc:
                raise UnsupportedIndexKind(
                    f"index factory: {factory.strip()!r} cannot be built by the "
                    f"{ctx.settings.vector_store_backend} vector store (CBIR_VECTOR_STORE): {exc}"
                ) from None
            kind = normalised.split(",", 1)[1]
    with ctx.write_lock:
        with ctx.db.transaction() as session:
            live = require_collection(session, name)
            changed = kind is not None and kind != live.index_factory
            if kind is not None:
                live.index_factory = kind
            merged = dict(live.index_params or {})
            for key in KNOBS:
                if key in params:
                    if params[key] is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = params[key]
            live.index_params = merged or None
        with ctx.db.session() as session:
            record = require_collection(session, name)
        ctx.indexes.set_knobs(record)
        started = False
        if changed:
            started = ctx.indexes.rebuild(record, reason=f"kind set to {record.index_factory}")
    return ctx.indexes.status(record), started


def measure_recall(ctx: AppContext, name: str) -> IndexStatus:
    """Measure recall@10 against exact search with held-out queries (``index.recall``), now."""
    with ctx.db.session() as session:
        record = require_collection(session, name)
    ctx.indexes.measure_recall(record)
    return ctx.indexes.status(record)
