"""The one ingest path: a single upload is a batch of one through the stages of a bulk import.

```
 ingest_batch  (uploads: the caller's thread)      --+
                                                      +-> decode_staged -> embed_staged -> write_staged
 Pipeline.run  (bulk imports: threads or processes) --+      (app/ingest/stages.py)       (this module)
```

Either runner hashes each image (SHA-256) and flags the bytes the collection already stores, then
decodes, validates, preprocesses and embeds the rest, and hands the batch to ``write_staged``.
Under the context's write lock that embeds again whatever a training or whitening switched the
served version under, then ``store_accepted`` writes files, rows and vectors: a row is committed
only after its file is on disk; vectors are committed with their rows; the index is updated after
the commit (a crash in between is repaired on start, because the index is checked against the
database).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import numpy as np
from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError

from app.catalog.collections import checkpoint_of, require_collection
from app.context import AppContext
from app.core.faults import crash_point, delay_point
from app.core.usertext import check_metadata, check_name
from app.data.orphans import remove_unreferenced_files
from app.data.records import CollectionRecord, EmbeddingRecord, ImageRecord, utcnow
from app.data.storage import sha256_hex, storage_faults
from app.data.vector_rows import CHUNK
from app.embedding.codes import degenerate_codes
from app.imaging.decoding import decoding, reserved_for_request
from app.imaging.image_end import strip_trailing
from app.ingest.file_writes import write_files
from app.ingest.stages import (
    Item,
    ItemResult,
    Staged,
    Target,
    decode_staged,
    embed_staged,
    mark_known,
    plain_decoder,
    resolve_target,
)

__all__ = ["Accepted", "Item", "ItemResult", "add_image", "ingest_batch", "store_accepted", "store_vectors"]

# Tries of one batch's transaction when other processes store the same bytes at the same time.
STORE_ATTEMPTS = 3


@dataclass
class Accepted:
    """A decoded image ready to store: its position in the batch's results and what the row needs."""

    index: int
    item: Item
    sha256: str
    format: str
    width: int
    height: int


def ingest_batch(
    ctx: AppContext, *, collection: str, items: Sequence[Item], durable: bool = True
) -> list[ItemResult]:
    """Store a batch of images in one transaction; returns one result per item, in order.

    ``durable=False`` skips the per-file fsync and syncs once before the commit instead
    (bulk imports); either way no row is committed before its file is on disk.
    """
    ctx.store.gate.check()  # read-only: a 503 before any decoding or embedding
    # Bytes after an image's end (a polyglot's HTML) are neither stored nor hashed.
    items = [replace(item, data=strip_trailing(item.data)) for item in items]
    staged = [Staged(i, item, sha256=sha256_hex(item.data)) for i, item in enumerate(items)]
    # The batch's decode memory stays reserved until it is stored (a re-embedding under the write
    # lock decodes again within it): 503 overloaded when there is none.
    with reserved_for_request(ctx, [item.data for item in items]):
        target = resolve_target(ctx, collection)
        mark_known(ctx, target, staged)
        decode = partial(decode_staged, target=target, opened=plain_decoder(ctx.limits))
        # Pillow releases the GIL while decoding: a batch decodes on several threads, so a GPU
        # embedder does not wait on one core's worth of JPEG decoding.
        list(ctx.workers.decoders.map(decode, staged) if len(staged) > 1 else map(decode, staged))
        embed_staged(
            staged,
            target,
            version=target.record.embedder_version,
            limit=ctx.settings.embed_batch_size,
            observe=partial(ctx.metrics.embedded, "upload"),
        )
        _, results = write_staged(ctx, target, staged, durable=durable)
    ctx.metrics.ingest_results("upload", results)
    return results


def write_staged(
    ctx: AppContext,
    target: Target,
    staged: list[Staged],
    *,
    durable: bool,
    in_transaction: Callable[[Any, list[ItemResult]], None] | None = None,
) -> tuple[Target, list[ItemResult]]:
    """Store decoded and embedded images in one transaction, under the write lock; returns the
    target written (a new one when the served version changed) and one result per image.
    ``in_transaction(session, results)`` runs inside the transaction (a job's counters)."""
    with ctx.write_lock:
        target = _refresh(ctx, target, staged)
        results: list[ItemResult | None] = [s.result for s in staged]
        accepted: list[Accepted] = []
        vectors: list[np.ndarray | None] = []
        for i, s in enumerate(staged):
            if s.result is None:
                assert s.sha256 is not None and s.format is not None
                accepted.append(Accepted(i, s.item, s.sha256, s.format, s.width, s.height))
                vectors.append(s.vector)

        def hook(session: Any) -> None:
            if in_transaction is not None:
                in_transaction(session, [r for r in results if r is not None])

        store_accepted(
            ctx,
            record=target.record,
            accepted=accepted,
            vectors=_stack(vectors) if target.trained else None,
            results=results,
            durable=durable,
            in_transaction=hook,
        )
    return target, [r for r in results if r is not None]


def _refresh(ctx: AppContext, target: Target, staged: list[Staged]) -> Target:
    """Under the write lock: if another writer switched the served version since we embedded (a
    training or whitening, which holds this lock when it switches), embed again with it, or these
    images would have no vector; an image flagged ``known`` whose row was deleted since is decoded
    and embedded now. Returns the target to write with."""
    with ctx.db.session() as session:
        live = require_collection(session, target.record.name)
        if live.embedder_version != target.record.embedder_version:
            target = Target(ctx, live, checkpoint_of(session, live))
        else:
            target.record = live  # index settings may have changed; the embedder has not
        known = [s.sha256 for s in staged if s.known]
        stored = (
            set(
                session.scalars(
                    select(ImageRecord.sha256)
                    .where(ImageRecord.collection_id == live.id)
                    .where(ImageRecord.sha256.in_(known))
                )
            )
            if known
            else set()
        )
    version = live.embedder_version
    redo = [
        s
        for s in staged
        if s.result is None
        and ((s.known and s.sha256 not in stored) or (not s.known and s.version != version))
    ]
    for s in redo:
        s.known = False
        s.vector = s.version = None
        # Under the write lock: never wait for the decode budget.
        decode_staged(s, target, opened=lambda data, side: decoding(ctx, data, budget=False, min_side=side))
    embed_staged(redo, target, version=version, limit=ctx.settings.embed_batch_size)
    for s in staged:
        if s.known and s.result is None and s.format is None:
            # Still stored: the write answers it as a duplicate; the row needs no decode.
            s.format, s.width, s.height = "PNG", 0, 0
    return target


def _stack(vectors: list[np.ndarray | None]) -> np.ndarray | None:
    """Rows aligned with the accepted images; those known as stored (duplicates, never written)
    get zeros, which nothing reads."""
    dims = {v.shape[0] for v in vectors if v is not None}
    if not dims:
        return None
    (dim,) = dims
    out = np.zeros((len(vectors), dim), dtype=np.float32)
    for i, vector in enumerate(vectors):
        if vector is not None:
            out[i] = vector
    return out


def store_accepted(
    ctx: AppContext,
    *,
    record: CollectionRecord,
    accepted: list[Accepted],
    vectors: np.ndarray | None,
    results: list[ItemResult | None],
    durable: bool,
    in_transaction: Callable[[Any], None] | None = None,
) -> None:
    """Write files, rows and vectors of ``accepted`` in one transaction (the caller holds
    the context's write lock), then add the new vectors to the index. ``in_transaction(session)`` runs last,
    inside the transaction, once every result is filled in (an import job's counters and
    high-water mark commit with its rows)."""
    # Load the index before the commit: a first load after it would already hold the new rows.
    ctx.indexes.get(record)
    # Named in the journal before any file is written: if the transaction never commits (a crash,
    # a kill -9), the next start finds these files and removes those no row refers to.
    with storage_faults(ctx.store.gate):
        ctx.store.journal.note(_entries(accepted))
    delay_point("store_batch")
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            with ctx.db.transaction() as session:
                new_ids, new_vectors = _store(
                    ctx,
                    session,
                    record=record,
                    accepted=accepted,
                    vectors=vectors,
                    results=results,
                    durable=durable,
                )
                if in_transaction is not None:
                    in_transaction(session)
            ctx.store.journal.settle(_entries(accepted))
            break
        except IntegrityError:
            # Another writer (a second process: `cbir import` beside the server, a second
            # replica) stored some of these bytes since we looked. The transaction rolled back;
            # the next attempt finds them and answers with their ids, as duplicates.
            if attempt == STORE_ATTEMPTS:
                remove_unreferenced_files(db=ctx.db, store=ctx.store, entries=_entries(accepted))
                raise
        except BaseException:
            remove_unreferenced_files(db=ctx.db, store=ctx.store, entries=_entries(accepted))
            with storage_faults(ctx.store.gate):  # a full disk is a 507, a read-only one a 503
                raise
    if len(new_ids):
        crash_point("after_db_commit_before_faiss_add")
        ctx.indexes.add(record, vectors=new_vectors, ids=new_ids)
        crash_point("after_faiss_add_before_response")


def _without_degenerate(
    record: CollectionRecord,
    *,
    fresh: list[tuple[Accepted, int]],
    vectors: np.ndarray | None,
    results: list[ItemResult | None],
    repeats: list[tuple[int, int]],
) -> list[tuple[Accepted, int]]:
    """``fresh`` without the items whose code is degenerate (a zero vector, NaN, infinity): those,
    and their repeats in the batch, are rejected with 422 degenerate_image before any file, row or
    vector is written, since no index could hold them. Only rows about to be written are checked
    (a bulk import's already-stored members carry no vector of their own)."""
    if vectors is None or not fresh:
        return fresh
    errors = degenerate_codes(vectors[[row for _, row in fresh]], embedder=record.embedder)
    if not errors:
        return fresh
    for position, (a, _) in enumerate(fresh):
        if position in errors:
            error = errors[position]
            results[a.index] = ItemResult(
                a.item.name, "rejected", code=error.code, detail=error.detail, error=error
            )
    for position, first in repeats:
        rejected = results[first]
        if rejected is not None and rejected.status == "rejected":
            results[position] = replace(rejected, name=results[position].name)  # type: ignore[union-attr]
    return [pair for position, pair in enumerate(fresh) if position not in errors]


def _entries(accepted: list[Accepted]) -> list[tuple[str, str]]:
    return [(a.sha256, a.format) for a in accepted]


def _store(
    ctx: AppContext,
    session: Any,
    *,
    record: CollectionRecord,
    accepted: list[Accepted],
    vectors: np.ndarray | None,
    results: list[ItemResult | None],
    durable: bool,
) -> tuple[np.ndarray, np.ndarray]:
    shas = list({a.sha256 for a in accepted})
    existing: dict[str, tuple[int, str | None]] = {}
    for start in range(0, len(shas), 500):
        existing.update(
            (sha, (image_id, name))
            for sha, image_id, name in session.execute(
                select(ImageRecord.sha256, ImageRecord.id, ImageRecord.original_name)
                .where(ImageRecord.collection_id == record.id)
                .where(ImageRecord.sha256.in_(shas[start : start + 500]))
            )
        )
    fresh: list[tuple[Accepted, int]] = []  # (item, row in vectors)
    seen: dict[str, Accepted] = {}
    repeats: list[tuple[int, int]] = []  # (item position, position of its first copy)
    # Other names of a stored image (the same bytes under another file name): kept as
    # metadata "aliases" so that name-based ground truth still finds every file.
    new_aliases: dict[int, set[str]] = {}  # existing image id -> names
    batch_aliases: dict[int, set[str]] = {}  # position of a first copy -> names
    for row, a in enumerate(accepted):
        name = (a.item.name or None) and a.item.name[-512:]
        if a.sha256 in existing:
            image_id, stored_name = existing[a.sha256]
            results[a.index] = ItemResult(a.item.name, "duplicate", image_id=image_id)
            if name and name != stored_name:
                new_aliases.setdefault(image_id, set()).add(name)
        elif a.sha256 in seen:
            original = seen[a.sha256]
            results[a.index] = ItemResult(a.item.name, "duplicate", detail="repeated in this batch")
            repeats.append((a.index, original.index))
            if name and name != original.item.name:
                batch_aliases.setdefault(original.index, set()).add(name)
        else:
            seen[a.sha256] = a
            fresh.append((a, row))
    if new_aliases:
        _add_aliases(session, new_aliases)
    fresh = _without_degenerate(record, fresh=fresh, vectors=vectors, results=results, repeats=repeats)
    if not fresh:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)

    def put(a: Accepted) -> None:
        ctx.store.put(a.item.data, sha256=a.sha256, image_format=a.format, fsync=durable)

    # Files and rows are written at the same time: creating files is system-call work that
    # releases the GIL, so a few threads write them (and sync them once, for a bulk batch) while
    # this thread inserts the rows; the transaction commits only after ``files_on_disk`` returned.
    files_on_disk = write_files(ctx.workers, [a for a, _ in fresh], put=put, sync=not durable)
    try:
        ids = _insert_images(session, record=record, fresh=fresh, batch_aliases=batch_aliases)
    except BaseException:
        files_on_disk(raising=False)  # no write may outlive the clean-up of this batch's files
        raise
    files_on_disk()  # raises the first file error (a full disk): the transaction rolls back
    id_array = np.asarray(ids, dtype=np.int64)
    for (a, _), image_id in zip(fresh, ids, strict=True):
        results[a.index] = ItemResult(a.item.name, "added", image_id=image_id)
    for position, first in repeats:
        results[position].image_id = results[first].image_id  # type: ignore[union-attr]

    if vectors is None:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    rows = np.asarray([row for _, row in fresh])
    new_vectors = np.ascontiguousarray(vectors[rows])
    store_vectors(
        session,
        image_ids=id_array,
        vectors=new_vectors,
        embedder=record.embedder,
        embedder_version=record.embedder_version or "",
    )
    return id_array, new_vectors


def _insert_images(
    session: Any,
    *,
    record: CollectionRecord,
    fresh: list[tuple[Accepted, int]],
    batch_aliases: dict[int, set[str]],
) -> list[int]:
    """Insert the rows of ``fresh`` and return their ids, in order."""
    now = utcnow()
    # One executemany of the rows, then their ids by SHA-256 (unique in the collection): an
    # INSERT ... RETURNING that keeps the parameters' order runs one statement per row on SQLite.
    session.connection().execute(
        insert(cast(Table, ImageRecord.__table__)),
        [
            {
                "collection_id": record.id,
                "sha256": a.sha256,
                "byte_size": len(a.item.data),
                "format": a.format,
                "width": a.width,
                "height": a.height,
                "original_name": (a.item.name or None) and a.item.name[-512:],
                # Core keys are column names: ImageRecord.meta is the column "metadata"
                "metadata": _with_aliases(a.item.metadata, batch_aliases.get(a.index)),
                "created_at": now,
            }
            for a, _ in fresh
        ],
    )
    new_shas = [a.sha256 for a, _ in fresh]
    id_of: dict[str, int] = {}
    for start in range(0, len(new_shas), CHUNK):
        id_of.update(
            (sha, image_id)
            for sha, image_id in session.execute(
                select(ImageRecord.sha256, ImageRecord.id)
                .where(ImageRecord.collection_id == record.id)
                .where(ImageRecord.sha256.in_(new_shas[start : start + CHUNK]))
            )
        )
    return [id_of[sha] for sha in new_shas]


MAX_ALIASES = 64


def _with_aliases(meta: dict[str, Any] | None, names: set[str] | None) -> dict[str, Any]:
    meta = dict(meta or {})
    if names:
        stored = meta.get("aliases")
        known: list[Any] = stored if isinstance(stored, list) else []
        meta["aliases"] = sorted(set(known) | names)[:MAX_ALIASES]
    return meta


def _add_aliases(session: Any, aliases: dict[int, set[str]]) -> None:
    rows = session.execute(
        select(ImageRecord.id, ImageRecord.meta).where(ImageRecord.id.in_(list(aliases)))
    ).all()
    for image_id, meta in rows:
        merged = _with_aliases(meta, aliases[image_id])
        if merged != (meta or {}):
            session.execute(update(ImageRecord).where(ImageRecord.id == image_id).values(meta=merged))


def store_vectors(
    session: Any, *, image_ids: np.ndarray, vectors: np.ndarray, embedder: str, embedder_version: str
) -> None:
    """Insert (n, d) float32 unit rows as blobs keyed by image id and embedder version."""
    now = utcnow()
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    session.connection().execute(  # Core executemany: no ORM bookkeeping per row
        insert(cast(Table, EmbeddingRecord.__table__)),
        [
            {
                "image_id": int(image_id),
                "embedder": embedder,
                "embedder_version": embedder_version,
                "dim": vectors.shape[1],
                "vector": vectors[i].tobytes(),
                "created_at": now,
            }
            for i, image_id in enumerate(image_ids)
        ],
    )


def add_image(
    ctx: AppContext, *, collection: str, data: bytes, name: str | None, metadata: dict[str, Any] | None
) -> ItemResult:
    """Store one uploaded image; a rejected one raises its CbirError (a 4xx for the client)."""
    check_name(name)  # text the database, the JSON encoder and SQL JSON functions all accept
    item = Item(name=name, data=data, metadata=check_metadata(metadata or {}))
    (result,) = ingest_batch(ctx, collection=collection, items=[item])
    if result.error is not None:
        raise result.error
    return result
