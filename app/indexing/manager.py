"""Keeps each collection's FAISS index in memory, checked against the database, saved atomically.

The database is the source of truth: an index file is a cache. On load it must carry the
collection's embedder version; its ids are compared with the database's (ids only, one query):
what the file lacks is replayed from the embeddings table and what the database no longer holds is
removed, unless the difference is too large, or the file is missing, torn or of another version:
then the index is rebuilt from the database. A small collection is rebuilt at once; a large one
in the background, and meanwhile its searches answer 503 (``IndexRebuilding``), never an empty
result. Rebuilding into another kind (``rebuild``) runs in the background while the old index keeps
serving; writes that arrive meanwhile go to both, and the new index takes over when it is ready.

Writes mark the index dirty; ``app.indexing.checkpoints`` saves them (atomically, with their
high-water mark) at most every ``save_interval`` seconds. Fresh indexes: ``app.indexing.builds``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from app.core.errors import IndexMismatch, IndexRebuilding, ReembedRequired
from app.core.faults import delay_point
from app.data.db import Database
from app.data.records import CollectionRecord
from app.data.vector_rows import has_images, load_ids, load_vectors, stored_dim
from app.indexing.builds import Build, Stopped, fresh_index, knobs_of, measure_recall, target_factory
from app.indexing.catch_up import catch_up
from app.indexing.checkpoints import Checkpoints
from app.indexing.problems import (
    BAD_INDEX_FACTORY,
    BAD_INDEX_PARAMS,
    INDEX_UNAVAILABLE,
    FactoryChecks,
    IndexProblems,
    checked_knobs,
    kept_factory,
)
from app.indexing.status import IndexStatus, status_of
from app.metrics.instruments import Metrics
from index import IndexCorrupt, VectorIndex
from index.fileformat import stale_temp_files
from index.kinds import AUTO, default_knobs

log = logging.getLogger(__name__)

# Deleted vectors a graph index may carry as tombstones before it is rebuilt without them.
TOMBSTONE_SHARE = 0.1


class IndexManager:
    def __init__(
        self,
        *,
        db: Database,
        index_dir: Path,
        save_interval: float = 2.0,
        sync_rebuild_max: int = 50_000,
        read_only: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.metrics = metrics or Metrics()
        # CBIR_READ_ONLY: indexes are loaded or built in memory, never written.
        self.read_only = read_only
        self.index_dir = index_dir
        # Rebuilds of at most this many vectors run in the caller, larger ones in the background.
        self.sync_rebuild_max = sync_rebuild_max
        self._lock = threading.RLock()
        self._indexes: dict[int, VectorIndex] = {}
        self._builds: dict[int, Build] = {}
        self._errors: dict[int, str] = {}
        # Images but no vector of their version: 503 reembed_required, never an empty index.
        self._unembedded: dict[int, str] = {}
        self.factory_checks = FactoryChecks()  # settings refused, indexes that cannot open: reported
        self.problems = IndexProblems(checks=self.factory_checks)
        self._stop = threading.Event()
        self.checkpoints = Checkpoints(
            path_for=self.path_for,
            index_of=self._indexes.get,
            lock=self._lock,
            stop=self._stop,
            save_interval=save_interval,
            read_only=read_only,
        )

    def path_for(self, collection_id: int) -> Path:
        return self.index_dir / f"collection-{collection_id}.cbidx"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.read_only:
            return  # nothing to clean up or checkpoint
        for path in stale_temp_files(self.index_dir):
            log.warning("removing %s, a checkpoint that a killed process left half written", path.name)
            path.unlink(missing_ok=True)
        if not self.checkpoints.saving:
            self._stop.clear()
            self.checkpoints.start_saver()

    def stop(self) -> None:
        self._stop.set()
        self.checkpoints.stop_saver()
        for build in list(self._builds.values()):
            build.done.wait(timeout=1)  # a build notices the stop between its phases
        self.flush_all(force=True)

    # -- access ----------------------------------------------------------------------------
    def get(self, collection: CollectionRecord) -> VectorIndex | None:
        """The served index of a collection: None while it has no embedder version, or while its
        only index is being built in the background (``serving`` raises then)."""
        if collection.embedder_version is None:
            return None
        with self._lock:
            index = self._indexes.get(collection.id)
            if index is not None and index.meta.get("embedder_version") == collection.embedder_version:
                return index
            build = self._builds.get(collection.id)
            if build is not None and build.version == collection.embedder_version:
                return None
            if not self.problems.may_open(collection.id):
                return None  # it failed moments ago: 503 until it is tried again
            try:
                index = self._open(collection)
            except (SQLAlchemyError, Stopped):
                raise  # the database is away (a 503 per request) or the service is stopping
            except Exception as exc:  # one broken index must stop neither the start nor the others
                self.problems.open_failed(collection, exc)
                index = None
            else:
                self.problems.opened(collection.id)
            if index is not None:
                self._indexes[collection.id] = index
            else:
                self._indexes.pop(collection.id, None)
            return index

    def serving(self, collection: CollectionRecord) -> VectorIndex | None:
        """The index searches use; ``IndexRebuilding`` (503) while none can serve yet, None when
        the collection has no embedder version."""
        index = self.get(collection)
        if index is None and collection.embedder_version is not None:
            if collection.id in self._unembedded:
                raise ReembedRequired(self._unembedded[collection.id])
            broken = self.problems.get(collection.id, INDEX_UNAVAILABLE)
            if broken is not None and collection.id not in self._builds:
                raise IndexMismatch(f"collection {collection.name!r}: {broken.detail}")
            build = self._builds.get(collection.id)
            detail = f"the index of {collection.name!r} is being built from the database"
            if build is not None:
                detail += f" (since {build.started_at}: {build.reason})"
            raise IndexRebuilding(f"{detail}; retry shortly")
        return index

    def _open(self, collection: CollectionRecord) -> VectorIndex | None:
        """Load the file and catch it up with the database, or rebuild (here when small, else in
        the background, returning None). Called under the lock."""
        version = collection.embedder_version
        assert version is not None
        started = time.perf_counter()
        db_ids = load_ids(self.db, collection_id=collection.id, embedder_version=version)
        if not len(db_ids) and has_images(self.db, collection_id=collection.id):
            if collection.id not in self._unembedded:
                log.error(
                    "collection %s has images but no %s vector: 503 until re-embedded",
                    collection.name,
                    version,
                )
            self._unembedded[collection.id] = (
                f"collection {collection.name!r} has images but none has a vector of its embedder "
                f"version {version}; re-embed it (PUT /api/v1/collections/{collection.name}/embedder) first"
            )
            return None
        self._unembedded.pop(collection.id, None)
        path = self.path_for(collection.id)
        reason = ""
        try:
            index = VectorIndex.load(path)
            dim = stored_dim(self.db, collection_id=collection.id, embedder_version=version)
            if index.meta.get("embedder_version") != version:
                reason = (
                    f"the file holds embedder version {index.meta.get('embedder_version')!r}, not {version!r}"
                )
            elif index.ntotal and dim is not None and dim != index.dim:
                reason = f"the file holds {index.dim}-d vectors, the database {dim}-d ones"
            else:
                caught_up = self._catch_up(collection, index, db_ids)
                if caught_up:
                    took = time.perf_counter() - started
                    log.info(
                        "index of %s loaded from %s (%d vectors, %.2f s)",
                        collection.name,
                        path,
                        index.ntotal,
                        took,
                    )
                    dim = index.dim if index.ntotal else None
                    self.problems.settings(collection, dim=dim, served=index.factory)
                    self._maybe_grow(collection, index)
                    return index
                reason = "the file is too far behind the database"
        except FileNotFoundError:
            reason = "there is no index file"
        except IndexCorrupt as exc:
            reason = f"the index file is unreadable ({exc})"
            if not self.read_only:  # a read-only data folder keeps it; the index is built in memory
                path.replace(path.with_suffix(".corrupt"))
        level = logging.WARNING if len(db_ids) else logging.INFO
        log.log(level, "index of %s not loaded: %s; building it from the database", collection.name, reason)
        if len(db_ids) <= self.sync_rebuild_max:
            return self._build_now(collection, reason=reason)
        self._start_build(collection, factory=None, reason=reason)
        return None

    def _catch_up(self, collection: CollectionRecord, index: VectorIndex, db_ids: np.ndarray) -> bool:
        caught_up = catch_up(self.db, collection, index, db_ids, problems=self.problems)
        if caught_up is not None and any(caught_up):
            self.checkpoints.mark(collection.id)
        return caught_up is not None

    def _fresh(self, collection: CollectionRecord, *, factory: str | None) -> tuple[VectorIndex, float]:
        """A new index of the collection's vectors as the database holds them now, recall measured."""
        fresh = fresh_index(self.db, collection, factory=factory, problems=self.problems, stopping=self._stop)
        if fresh.index.ntotal:  # the first, empty index of a new collection is no rebuild
            self.metrics.index_rebuilt(collection.name)
        if fresh.error is not None:
            self._errors[collection.id] = fresh.error
        return fresh.index, fresh.seconds

    def _build_now(self, collection: CollectionRecord, *, reason: str) -> VectorIndex:
        index, seconds = self._fresh(collection, factory=None)
        self.checkpoints.clean(collection.id)
        self.checkpoints.save(collection.id, index)
        log.info("index of %s built (%s; %d vectors, %.2f s)", collection.name, reason, index.ntotal, seconds)
        return index

    def reconcile(self, collection: CollectionRecord) -> tuple[int, int]:
        """Catch the served index up with the database now; (re-added, removed)."""
        with self._lock:
            index = self._indexes.get(collection.id)
            if index is None or collection.embedder_version is None:
                return 0, 0  # opened, and caught up, on first use
            db_ids = load_ids(
                self.db, collection_id=collection.id, embedder_version=collection.embedder_version
            )
            counts = catch_up(self.db, collection, index, db_ids, problems=self.problems)
            if counts is None:
                self.rebuild(collection, reason="too far behind the database")
                return 0, 0
            if any(counts):
                self.checkpoints.mark(collection.id)
            return counts

    def check_kind(self, factory: str, *, dim: int | None) -> None:
        """Every kind ``factory_checks.validate`` passed is one FAISS builds (the store seam's refusal)."""

    # -- background builds -----------------------------------------------------------------
    def rebuild(
        self, collection: CollectionRecord, *, factory: str | None = None, reason: str = "requested"
    ) -> bool:
        """Rebuild in the background (into ``factory``, else the collection's kind) while the
        current index keeps serving; when a build is running, another follows it (it reads the
        collection's kind when it starts). False when there is nothing to build."""
        if collection.embedder_version is None:
            return False
        with self._lock:
            if (running := self._builds.get(collection.id)) is not None:
                running.queued = reason
            else:
                self._start_build(collection, factory=factory, reason=reason)
            return True

    def _start_build(self, collection: CollectionRecord, *, factory: str | None, reason: str) -> None:
        assert collection.embedder_version is not None
        build = Build(
            version=collection.embedder_version,
            factory=factory,
            reason=reason,
            collection=collection.name,
            target=factory or collection.index_factory or AUTO,
        )
        self._builds[collection.id] = build
        self._errors.pop(collection.id, None)
        thread = threading.Thread(
            target=self._run_build, args=(collection, build), name=f"index-build-{collection.id}", daemon=True
        )
        thread.start()

    def _run_build(self, collection: CollectionRecord, build: Build) -> None:
        try:
            delay_point("index_build")
            index, seconds = self._fresh(collection, factory=build.factory)
            with self._lock:
                current = self._builds.get(collection.id)
                if current is not build:
                    return  # dropped or superseded meanwhile
                for op, ids, vectors in build.pending:
                    if op == "add" and vectors is not None:
                        keep = ~np.isin(ids, index.ids())
                        if keep.any():
                            index.add(vectors[keep], ids[keep])
                    elif op == "remove":
                        index.remove(ids)
                self._indexes[collection.id] = index
                del self._builds[collection.id]
                self.checkpoints.mark(collection.id)
                self.problems.opened(collection.id)
            log.info(
                "index of %s rebuilt as %s in the background (%s; %d vectors, %.1f s)",
                collection.name,
                index.kind,
                build.reason,
                index.ntotal,
                seconds,
            )
            self.flush(collection.id)
        except Stopped:
            with self._lock:
                if self._builds.get(collection.id) is build:
                    del self._builds[collection.id]
        except Exception as exc:
            log.exception("background index build of %s failed", collection.name)
            with self._lock:
                if self._builds.get(collection.id) is build:
                    del self._builds[collection.id]
                self._errors[collection.id] = f"{type(exc).__name__}: {exc}"
        finally:
            if build.queued is not None and not self._stop.is_set():
                self._follow_up(collection.id, reason=build.queued)
            build.done.set()

    def _follow_up(self, collection_id: int, *, reason: str) -> None:
        """Start the build a kind set during the last one asked for, with the collection as stored now."""
        try:
            with self.db.session() as session:
                record = session.get(CollectionRecord, collection_id)
        except SQLAlchemyError:  # the next write or start sees the kind differ and builds it then
            log.exception("the index build that was to follow cannot start")
            return
        with self._lock:
            if (
                record is not None
                and record.embedder_version is not None
                and collection_id not in self._builds
            ):
                self._start_build(record, factory=None, reason=reason)

    def wait_for_build(self, collection_id: int, timeout: float | None = None) -> bool:
        """Block until the collection's background build (if any) ends; False on timeout."""
        build = self._builds.get(collection_id)
        return True if build is None else build.done.wait(timeout)

    def _maybe_grow(self, collection: CollectionRecord, index: VectorIndex) -> None:
        """Rebuild in the background when ``auto`` now calls for another kind, or when tombstones
        pile up. Called under the lock."""
        if collection.id in self._builds or index.ntotal == 0:
            return
        if kept_factory(collection, served=index.factory, dim=index.dim, checks=self.factory_checks):
            return  # a file of a kind cbir no longer builds serves as it is (reported, not rebuilt)
        wanted = target_factory(collection, n=index.ntotal, dim=index.dim, checks=self.factory_checks)
        if wanted != index.factory:
            self._start_build(collection, factory=None, reason=f"{index.ntotal} vectors: {wanted[7:]} is due")
            return
        if index.tombstones > max(1000, TOMBSTONE_SHARE * index.ntotal):
            self._start_build(collection, factory=None, reason=f"{index.tombstones} deleted vectors to drop")

    # -- writes ----------------------------------------------------------------------------
    def build(self, collection: CollectionRecord) -> VectorIndex:
        """Rebuild from the database now (after a re-embed or version switch) and save."""
        with self._lock:
            if (moot := self._builds.pop(collection.id, None)) is not None:
                moot.queued = None  # a background build of the old state, and what was to follow, is moot
            self._unembedded.pop(collection.id, None)
            index = self._build_now(collection, reason="rebuild requested")
            self._indexes[collection.id] = index
            self.problems.opened(collection.id)
            return index

    def add(self, collection: CollectionRecord, *, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids) == 0 or collection.embedder_version is None:
            return
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            build = self._builds.get(collection.id)
            if build is not None:
                build.pending.append(("add", ids.copy(), np.array(vectors, dtype=np.float32)))
            index = self.get(collection)
            if index is None:
                return  # the build in progress reads these rows or replays them from pending
            keep = ~index.contains_many(ids)  # a first load after the commit already holds them
            if not keep.any():
                return
            if index.ntotal == 0 and index.dim != vectors.shape[1]:
                # An empty index is created before the dimension is known; recreate it with the right one.
                index = VectorIndex(vectors.shape[1], factory=index.factory, meta=index.meta)
                self._indexes[collection.id] = index
            index.add(vectors[keep], ids[keep])
            self.checkpoints.mark(collection.id)
            self._maybe_grow(collection, index)

    def remove(self, collection: CollectionRecord, ids: np.ndarray) -> None:
        self.problems.forget_ids(collection.id, ids)
        with self._lock:
            build = self._builds.get(collection.id)
            if build is not None:
                build.pending.append(("remove", np.asarray(ids, dtype=np.int64), None))
            index = self.get(collection)
            if index is not None and index.remove(ids):
                self.checkpoints.mark(collection.id)
                self._maybe_grow(collection, index)

    def drop(self, collection_id: int) -> None:
        with self._lock:
            self._indexes.pop(collection_id, None)
            if (moot := self._builds.pop(collection_id, None)) is not None:
                moot.queued = None
            self.checkpoints.clean(collection_id)
            self.problems.forget(collection_id)
            self.path_for(collection_id).unlink(missing_ok=True)

    def set_knobs(self, collection: CollectionRecord) -> None:
        """Apply the collection's stored search parameters to its served index."""
        self.problems.note(collection.id, checked_knobs(collection)[1], code=BAD_INDEX_PARAMS)
        index = self.get(collection)
        if index is not None:
            index.set_search_knobs(default_knobs(index.kind).merged(knobs_of(collection)))
            with self._lock:
                self.checkpoints.mark(collection.id)

    def measure_recall(self, collection: CollectionRecord) -> float | None:
        """Recall@10 of the served index against exact search over the stored vectors, with held-out
        queries (``index.recall``), now."""
        index = self.serving(collection)
        if index is None or collection.embedder_version is None:
            return None
        vectors, ids = load_vectors(
            self.db, collection_id=collection.id, embedder_version=collection.embedder_version
        )
        live = np.isin(ids, index.ids())  # rows committed but not yet added are not the index's fault
        recall = measure_recall(index, vectors[live], ids[live])
        with self._lock:
            self.checkpoints.mark(collection.id)
        return recall

    # -- checkpoints -----------------------------------------------------------------------
    def flush(self, collection_id: int, *, force: bool = True) -> None:
        self.checkpoints.flush(collection_id, force=force)

    def flush_all(self, *, force: bool = False) -> None:
        self.checkpoints.flush_all(force=force)

    # -- reporting -------------------------------------------------------------------------
    def checkpoint_errors(self) -> dict[int, str]:  # collection id -> why its last save failed
        return self.checkpoints.errors()

    def sizes(self) -> dict[int, int]:  # collection id -> vectors, of the indexes held in memory
        with self._lock:
            return {collection_id: index.ntotal for collection_id, index in self._indexes.items()}

    def unavailable(self) -> dict[str, str]:
        """Collections whose searches answer 503 index_rebuilding now (a build in progress and no
        index serving meanwhile), with the build's reason: what keeps the service not ready."""
        with self._lock:
            return {
                build.collection: build.reason
                for collection_id, build in self._builds.items()
                if (index := self._indexes.get(collection_id)) is None
                or index.meta.get("embedder_version") != build.version
            }

    def status(self, collection: CollectionRecord) -> IndexStatus:
        index = self.get(collection)
        factory = self.problems.get(collection.id, BAD_INDEX_FACTORY)
        build = self._builds.get(collection.id)
        rebuild = None
        if build is not None:  # "queued": a kind set meanwhile, built next
            rebuild = {k: getattr(build, k) for k in ("target", "reason", "started_at", "queued")}
        return status_of(
            collection,
            index=index,
            rebuild=rebuild,
            last_error=self._errors.get(collection.id) or (factory.detail if factory is not None else None),
            problems=[asdict(p) for p in self.problems.of(collection.id)],
        )
