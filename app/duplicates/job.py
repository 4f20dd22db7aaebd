"""The near-duplicate job: read the served codes, find the pairs within the threshold, group them,
judge each group against the stored resolutions, and store the run (replacing the previous one)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import update

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.cancel import NEVER, CancelToken
from app.core.errors import EmbedderNotReady, InvalidRequest
from app.core.memory import tune_malloc
from app.data.records import DuplicateRunRecord
from app.duplicates.codes import read_codes
from app.duplicates.defaults import default_threshold
from app.duplicates.storage import RunFacts, save_run
from index.pairs import similar_pairs

KIND = "duplicates"


def check_threshold(threshold: float | None) -> None:
    """422 for a threshold that is not a cosine similarity in (0, 1]."""
    if threshold is not None and not (np.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise InvalidRequest(f"threshold {threshold} is not a cosine similarity in (0, 1]")


def check_run(ctx: AppContext, *, collection: str, threshold: float | None) -> float:
    """The threshold a run of the collection would use, before it is queued: 404 for an unknown
    collection, 422 for a bad threshold, 409 while it has no codes (an untrained embedder)."""
    check_threshold(threshold)
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        embedder, version = record.embedder, record.embedder_version
    if version is None:
        raise EmbedderNotReady(
            f"collection {collection!r} has no trained embedder yet, so no codes to compare"
        )
    return default_threshold(embedder) if threshold is None else float(threshold)


def find_duplicates(
    ctx: AppContext,
    *,
    collection: str,
    threshold: float | None,
    token: CancelToken = NEVER,
    job_id: str | Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """Find and store the collection's near-duplicate groups at ``threshold`` (cosine of the served
    codes; None: ``default_threshold``); a summary of the run. ``token`` is checked between chunks
    and blocks; the run is stored (replacing the previous one) only when it completes."""
    check_threshold(threshold)
    # Blocks of gathered codes come and go by the thousand: each from a mapping of its own that is
    # returned when freed, or glibc's heaps keep their peak (1M x 1280-d codes: 10.1 GB peak RSS
    # instead of the codes' 5 GB plus work). What the service sets on start; workers and the CLI too.
    tune_malloc()
    started = time.perf_counter()
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        collection_id, embedder, version = record.id, record.embedder, record.embedder_version
    if version is None:
        raise EmbedderNotReady(
            f"collection {collection!r} has no trained embedder yet, so no codes to compare"
        )
    threshold = default_threshold(embedder) if threshold is None else float(threshold)
    vectors, ids, refused = read_codes(
        ctx.db, collection_id=collection_id, embedder_version=version, check=token.check
    )
    read_s = time.perf_counter() - started
    pairs = similar_pairs(vectors, ids, threshold=threshold, check=token.check)
    images, dim = vectors.shape
    del vectors  # the codes are the bulk of the job's memory: gone before the rows are written
    pairs_s = time.perf_counter() - started - read_s
    token.check()
    facts = RunFacts(
        job_id=job_id() if callable(job_id) else job_id,
        embedder_version=version,
        threshold=threshold,
        images=images,
        truncated_rows=pairs.truncated_rows,
        method=pairs.method,
        seconds=0.0,
    )
    ctx.store.gate.check()  # 503 read_only
    with ctx.db.transaction() as session:
        counts = save_run(session, collection_id=collection_id, facts=facts, pairs=pairs, check=token.check)
        seconds = time.perf_counter() - started
        session.execute(
            update(DuplicateRunRecord)
            .where(DuplicateRunRecord.collection_id == collection_id)
            .values(seconds=round(seconds, 3))
        )
        token.settle()  # committed next: a cancel from here on is refused
    return {
        "collection": collection,
        "threshold": threshold,
        "images": images,
        "dim": dim,
        "refused": refused,
        "pairs": len(pairs),
        **counts,
        "truncated_rows": pairs.truncated_rows,
        "method": pairs.method,
        "seconds": round(seconds, 3),
        "timings_s": {
            "read": round(read_s, 3),
            "pairs": round(pairs_s, 3),
            "store": round(seconds - read_s - pairs_s, 3),
        },
    }
