"""Collections' vectors kept in a vector store (``CBIR_VECTOR_STORE=milvus://...``) rather than in
FAISS indexes of this process: the same surface as ``IndexManager`` for search, ingest, the catalog
and the index admin, over ``index.store.VectorStore``.

The database stays the source of truth. A collection's space (one per collection and embedder
version, ``index.store.space_name``) is reconciled with the database when this process first serves
the collection (so on every start) and on demand (``rebuild``, ``build``): ids the store lacks are
re-added from the stored embeddings, ids the database no longer holds are deleted. A kind the store
cannot build is refused by ``check_kind`` (422), and a stored one it cannot build serves Flat with
the ``bad_index_factory`` problem, as with FAISS.

A space's name is an alias of the space that holds the vectors: a rebuild (a new kind, a re-embed)
fills a new one while the old one serves and then switches the alias (``store_index.build_beside``).
Several replicas share the store: each checks, on every ``get``, the collection's row against the
settings its index was opened with (a kind set by another replica is read back from the store), and
a space dropped by another process is re-opened and reconciled by the read or write that finds it
gone. ``refresh`` forgets everything this process knows of the store; ``reconcile`` re-checks one
collection now.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from app.core.errors import IndexMismatch, ReembedRequired
from app.data.db import Database
from app.data.records import CollectionRecord
from app.data.vector_rows import fields_of, has_images, load_ids, load_vectors, stored_dim, vectors_of
from app.indexing.builds import measure_recall, now
from app.indexing.problems import (
    BAD_INDEX_FACTORY,
    BAD_INDEX_PARAMS,
    FactoryChecks,
    IndexProblems,
    checked_factory,
    checked_knobs,
    factory_problem,
)
from app.indexing.status import IndexStatus, status_of
from app.indexing.store_index import StoreIndex, build_beside, create_serving, unused_spaces
from app.metrics.instruments import Metrics
from index.kinds import AUTO, EXACT_MAX, default_knobs
from index.store import Reconciled, Rows, SpaceMissing, UnsupportedKind, VectorStore, reconcile, space_name

log = logging.getLogger(__name__)

# Re-added rows past which the space is sealed at once (milvus-lite searches unsealed rows by brute
# force; a real Milvus seals on its own).
FLUSH_AFTER = 1000
NOTHING = Reconciled(added=0, removed=0)


def settings_of(collection: CollectionRecord) -> tuple[str | None, str, str]:
    """What an open index depends on in the collection's row: embedder version, kind, search
    parameters (as JSON)."""
    params = json.dumps(collection.index_params, sort_keys=True, default=str)
    return collection.embedder_version, collection.index_factory or AUTO, params


class StoreIndexManager:
    def __init__(
        self,
        *,
        db: Database,
        store: VectorStore,
        prefix: str = "cbir",
        read_only: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.metrics = metrics or Metrics()
        self.store = store
        self.prefix = prefix
        # CBIR_READ_ONLY: the store is read, never written (reconciliation waits for a writer).
        self.read_only = read_only
        self._lock = threading.RLock()
        self._indexes: dict[int, StoreIndex] = {}
        self._errors: dict[int, str] = {}
        self._unembedded: dict[int, str] = {}
        # Per collection, its settings as they were when its index was opened (``settings_of``).
        self._seen: dict[int, tuple[str | None, str, str]] = {}
        self.factory_checks = FactoryChecks()
        self.problems = IndexProblems(checks=self.factory_checks)

    def space_of(self, collection_id: int, embedder_version: str) -> str:
        return space_name(collection_id=collection_id, embedder_version=embedder_version, prefix=self.prefix)

    def _spaces_of(self, collection_id: int) -> list[str]:
        head = f"{self.prefix}_c{int(collection_id)}_"
        return [name for name in self.store.spaces() if name.startswith(head)]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start: each collection is reconciled when it is first served."""

    def stop(self) -> None:
        with self._lock:
            self._indexes.clear()
            self._seen.clear()

    # -- kinds -----------------------------------------------------------------------------
    def check_kind(self, factory: str, *, dim: int | None) -> None:
        """``UnsupportedKind`` when the store cannot build ``factory`` (normalised, ``IDMap2,...``)."""
        self.store.check_kind(factory.removeprefix("IDMap2,"), dim=dim)

    def _kind_for(self, collection: CollectionRecord, *, n: int, dim: int | None) -> str:
        """The kind the collection's space should have: ``auto`` is Flat up to EXACT_MAX vectors,
        then HNSW32; a kind the store cannot build serves Flat, with the problem reported."""
        self.problems.settings(collection, dim=dim)
        requested, _ = checked_factory(collection, dim=dim, checks=self.factory_checks)
        if requested == AUTO:
            return "Flat" if n <= EXACT_MAX else "HNSW32"
        kind = requested.removeprefix("IDMap2,")
        try:
            self.store.check_kind(kind, dim=dim)
        except UnsupportedKind as exc:
            why = f"the {self.store.backend} vector store cannot build {kind}: {exc}"
            self.problems.note(collection.id, factory_problem(collection, why), code=BAD_INDEX_FACTORY)
            self._errors[collection.id] = f"{why}; serving Flat"
            return "Flat"
        return kind

    # -- access ----------------------------------------------------------------------------
    def get(self, collection: CollectionRecord) -> StoreIndex | None:
        """The collection's space, reconciled with the database the first time; None while it has
        no embedder version, or images but no vector of that version.

        The index kept is checked against ``collection`` as read now (another replica may have
        changed it): a new embedder version re-opens and reconciles the space, a new kind re-reads
        the space's kind from the store (the replica that set it rebuilds it), new search
        parameters are taken as they are."""
        version = collection.embedder_version
        if version is None:
            return None
        index = self._indexes.get(collection.id)
        if index is not None and self._seen.get(collection.id) == settings_of(collection):
            return index  # without the lock: searches go on while this process builds a space
        with self._lock:
            index = self._indexes.get(collection.id)
            if index is not None:
                fresh = self._fresh(collection, index)
                if fresh is not None:
                    return fresh
            index, _ = self._open(collection, rebuild=False)
            self._keep(collection, index)
            return index

    def _fresh(self, collection: CollectionRecord, index: StoreIndex) -> StoreIndex | None:
        """``index`` brought up to date with ``collection``'s settings without a reconcile, or None
        when it must be re-opened (another embedder version, or its space is gone). Under the lock."""
        seen = self._seen.get(collection.id)
        now_seen = settings_of(collection)
        if seen == now_seen:
            return index
        if seen is None or seen[0] != now_seen[0]:
            return None
        if seen[1] != now_seen[1] and index.created:
            self.store.forget(index.space)
            if not self.store.exists(index.space):
                return None
            self._kind_for(collection, n=0, dim=index.dim)  # notes (or clears) a bad kind's problem
            index = self._index(
                collection.id,
                index.space,
                dim=self.store.dim_of(index.space),
                kind=self.store.kind_of(index.space),
                meta=index.meta,
            )
        knobs, problem = checked_knobs(collection)
        self.problems.note(collection.id, problem, code=BAD_INDEX_PARAMS)
        index.set_search_knobs(default_knobs(index.kind).merged(knobs))
        self._keep(collection, index)
        return index

    def _keep(self, collection: CollectionRecord, index: StoreIndex | None) -> None:
        """Serve ``index`` for ``collection`` (as its settings read now). Under the lock."""
        if index is None:
            self._indexes.pop(collection.id, None)
            self._seen.pop(collection.id, None)
        else:
            self._indexes[collection.id] = index
            self._seen[collection.id] = settings_of(collection)

    def _index(
        self, collection_id: int, space: str, *, dim: int, kind: str, meta: dict[str, Any]
    ) -> StoreIndex:
        index = StoreIndex(self.store, space, dim=dim, kind=kind, meta=meta)
        index.reopen = lambda: self._reopened(collection_id, index)
        return index

    def _reopened(self, collection_id: int, gone: StoreIndex) -> StoreIndex | None:
        """The collection's space re-opened from the database after ``gone``'s space disappeared
        (dropped by another process): recreated and reconciled (read-only: empty until a writer
        does it)."""
        with self.db.session() as session:
            collection = session.get(CollectionRecord, collection_id)
        if collection is None or collection.embedder_version is None:
            return None
        with self._lock:
            kept = self._indexes.get(collection_id)
            if kept is not None and kept is not gone:
                return kept  # re-opened meanwhile
            self.store.forget(gone.space)
            index, _ = self._open(collection, rebuild=False)
            self._keep(collection, index)
            return index

    def refresh(self) -> None:
        """Forget every collection's index and what the store remembers of its spaces: each is
        re-opened (and reconciled) from the database and the store when next served."""
        with self._lock:
            self._indexes.clear()
            self._seen.clear()
            self.store.forget()

    def reconcile(self, collection: CollectionRecord) -> tuple[int, int]:
        """Reconcile the collection's space with the database now (after a worker that was writing
        it died): (ids re-added, ids removed). (0, 0) read-only or without an embedder version."""
        if collection.embedder_version is None or self.read_only:
            return 0, 0
        with self._lock:
            self.store.forget(self.space_of(collection.id, collection.embedder_version))
            index, done = self._open(collection, rebuild=False)
            self._keep(collection, index)
            return done.added, done.removed

    def serving(self, collection: CollectionRecord) -> StoreIndex | None:
        index = self.get(collection)
        if index is None and collection.embedder_version is not None:
            if collection.id in self._unembedded:
                raise ReembedRequired(self._unembedded[collection.id])
            raise IndexMismatch(f"the vectors of {collection.name!r} are not available; retry shortly")
        return index

    def _open(self, collection: CollectionRecord, *, rebuild: bool) -> tuple[StoreIndex | None, Reconciled]:
        """Reconcile (``rebuild``: recreate) the collection's space from the database: the index and
        what the reconciliation did. Under the lock."""
        version = collection.embedder_version
        assert version is not None
        started = time.perf_counter()
        db_ids = load_ids(self.db, collection_id=collection.id, embedder_version=version)
        if not len(db_ids) and has_images(self.db, collection_id=collection.id):
            self._unembedded[collection.id] = (
                f"collection {collection.name!r} has images but none has a vector of its embedder "
                f"version {version}; re-embed it (PUT /api/v1/collections/{collection.name}/embedder) first"
            )
            return None, NOTHING
        self._unembedded.pop(collection.id, None)
        dim = stored_dim(self.db, collection_id=collection.id, embedder_version=version)
        kind = self._kind_for(collection, n=len(db_ids), dim=dim)
        space = self.space_of(collection.id, version)
        meta = {"collection": collection.name, "embedder_version": version}
        exists = self.store.exists(space)
        built: Reconciled | None = None
        if exists and not self.read_only:
            stale = dim is not None and self.store.dim_of(space) != dim
            if rebuild or stale or self.store.kind_of(space) != kind:
                if dim is None:
                    self.store.drop(space)
                    exists = False
                else:  # filled beside the space that serves, which then switches to it at once
                    fill = lambda name: self._fill(collection, name, db_ids)  # noqa: E731
                    built = build_beside(self.store, space, dim=dim, kind=kind, fill=fill)
                    self.metrics.index_rebuilt(collection.name)
                    meta["built_at"] = now()
        if not exists:
            if dim is None or self.read_only:
                return self._index(collection.id, space, dim=0, kind=kind, meta=meta), NOTHING
            try:
                create_serving(self.store, space, dim=dim, kind=kind)
            except ValueError:
                if not self.store.exists(space):
                    raise
                # Created meanwhile by another replica (it reconciles it too: the same rows).
            meta["built_at"] = now()
        index = self._index(
            collection.id, space, dim=self.store.dim_of(space), kind=self.store.kind_of(space), meta=meta
        )
        done = built or NOTHING
        if not self.read_only and built is None:
            done = self._fill(collection, space, db_ids)
            if done.added or done.removed:
                log.info(
                    "vectors of %s reconciled with the database in %s: %d re-added, %d removed (%.2f s)",
                    collection.name,
                    self.store.backend,
                    done.added,
                    done.removed,
                    time.perf_counter() - started,
                )
        index.update_meta(build_seconds=round(time.perf_counter() - started, 3))
        index.set_search_knobs(default_knobs(index.kind).merged(checked_knobs(collection)[0]))
        self.problems.opened(collection.id)
        return index, done

    def _fill(self, collection: CollectionRecord, space: str, db_ids: np.ndarray) -> Reconciled:
        """``space`` reconciled with the database's ``db_ids`` (sealed after a bulk re-add)."""
        done = reconcile(self.store, space, db_ids=db_ids, fetch=lambda ids: self._rows(collection, ids))
        if done.added >= FLUSH_AFTER:
            self.store.flush(space)
        return done

    def _rows(self, collection: CollectionRecord, ids: np.ndarray) -> Rows:
        """The stored vectors of ``ids`` with their label and created time; rows set aside are left
        out (and reported)."""
        assert collection.embedder_version is not None
        refused: dict[int, str] = {}
        vectors, found = vectors_of(
            self.db, ids=ids, embedder_version=collection.embedder_version, refused=refused
        )
        if refused:
            self.problems.refused(collection, refused)
        return self._with_fields(found, vectors)

    def _with_fields(self, ids: np.ndarray, vectors: np.ndarray) -> Rows:
        fields = fields_of(self.db, ids=ids)
        labels = np.empty(len(ids), dtype=object)
        labels[:] = [fields.get(int(i), (None, 0))[0] for i in ids]
        created = np.fromiter((fields.get(int(i), (None, 0))[1] for i in ids), dtype=np.int64, count=len(ids))
        return Rows(ids=ids, vectors=vectors, labels=labels, created=created)

    # -- writes ----------------------------------------------------------------------------
    def add(self, collection: CollectionRecord, *, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Store committed rows' vectors (an id already stored is replaced: the same row)."""
        if len(ids) == 0 or collection.embedder_version is None or self.read_only:
            return
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        with self._lock:
            index = self.get(collection)
            if index is None:
                return
            if not index.created:
                kind = self._kind_for(collection, n=len(ids), dim=int(vectors.shape[1]))
                if not self.store.exists(index.space):
                    create_serving(self.store, index.space, dim=int(vectors.shape[1]), kind=kind)
                index = self._index(
                    collection.id,
                    index.space,
                    dim=self.store.dim_of(index.space),
                    kind=self.store.kind_of(index.space),
                    meta={**index.meta, "built_at": now()},
                )
                self._keep(collection, index)
        rows = self._with_fields(ids, vectors)
        try:
            self.store.upsert(
                index.space,
                ids=rows.ids,
                vectors=rows.vectors,
                labels=list(rows.labels),
                created=rows.created,
            )
        except SpaceMissing:
            # Dropped by another process: re-opening reconciles it, these committed rows included.
            self._reopened(collection.id, index)
            return
        index.changed()

    def remove(self, collection: CollectionRecord, ids: np.ndarray) -> None:
        self.problems.forget_ids(collection.id, ids)
        if self.read_only:
            return
        index = self.get(collection)
        if index is not None and index.created:
            try:
                self.store.delete(index.space, np.asarray(ids, dtype=np.int64))
            except SpaceMissing:
                self._reopened(collection.id, index)  # reconciled: the database no longer has them
                return
            index.changed()

    def drop(self, collection_id: int) -> None:
        """Forget the collection and drop its spaces (every embedder version's)."""
        with self._lock:
            self._indexes.pop(collection_id, None)
            self._seen.pop(collection_id, None)
            self.problems.forget(collection_id)
            self._errors.pop(collection_id, None)
            self._unembedded.pop(collection_id, None)
            if not self.read_only:
                for space in self._spaces_of(collection_id):
                    self.store.drop(space)

    def build(self, collection: CollectionRecord) -> StoreIndex | None:
        """Rebuild the collection's space from the database now, beside the one that serves (after a
        re-embed or a version switch); the spaces of its other versions are dropped, and spaces of
        this version that a build which died left behind."""
        with self._lock:
            self._errors.pop(collection.id, None)
            index, _ = self._open(collection, rebuild=True)
            self._keep(collection, index)
            if index is not None and not self.read_only:
                for name in unused_spaces(self.store, index.space, self._spaces_of(collection.id)):
                    self.store.drop(name)
            return index

    def rebuild(
        self, collection: CollectionRecord, *, factory: str | None = None, reason: str = "requested"
    ) -> bool:
        """Rebuild the space in the collection's kind from the database, now, in the caller: a new
        space is filled while the old one serves (searches here and in other replicas go on), then
        the collection's name (an alias) switches to it and the old one is dropped. ``factory`` is
        not taken: the kind is the collection's. False when there is nothing to build."""
        if collection.embedder_version is None:
            return False
        log.info("vectors of %s rebuilt in %s (%s)", collection.name, self.store.backend, reason)
        return self.build(collection) is not None

    def wait_for_build(self, collection_id: int, timeout: float | None = None) -> bool:
        return True  # builds run in the caller

    def set_knobs(self, collection: CollectionRecord) -> None:
        """Take the collection's search parameters (passed to the store with every search)."""
        knobs, problem = checked_knobs(collection)
        self.problems.note(collection.id, problem, code=BAD_INDEX_PARAMS)
        index = self.get(collection)
        if index is not None:
            index.set_search_knobs(default_knobs(index.kind).merged(knobs))

    def measure_recall(self, collection: CollectionRecord) -> float | None:
        """Recall@10 of the store's search against exact search over the stored vectors (held-out
        queries, ``index.recall``)."""
        index = self.serving(collection)
        if index is None or collection.embedder_version is None:
            return None
        vectors, ids = load_vectors(
            self.db, collection_id=collection.id, embedder_version=collection.embedder_version
        )
        live = np.isin(ids, index.ids())
        return measure_recall(index, vectors[live], ids[live])

    def flush(self, collection_id: int, *, force: bool = True) -> None:
        """Seal the collection's space (after an import)."""
        index = self._indexes.get(collection_id)
        if index is not None and index.created and not self.read_only:
            self.store.flush(index.space)

    def flush_all(self, *, force: bool = False) -> None:
        """Nothing to save: the store keeps its own data."""

    # -- reporting -------------------------------------------------------------------------
    def checkpoint_errors(self) -> dict[int, str]:
        return {}

    def sizes(self) -> dict[int, int]:  # collection id -> vectors, of the spaces opened here
        with self._lock:
            indexes = list(self._indexes.items())
        return {collection_id: index.ntotal for collection_id, index in indexes}  # counts cached a while

    def unavailable(self) -> dict[str, str]:
        return {}

    def status(self, collection: CollectionRecord) -> IndexStatus:
        index = self.get(collection)
        factory = self.problems.get(collection.id, BAD_INDEX_FACTORY)
        return status_of(
            collection,
            index=index,
            rebuild=None,
            last_error=self._errors.get(collection.id) or (factory.detail if factory is not None else None),
            problems=[asdict(p) for p in self.problems.of(collection.id)],
        )
