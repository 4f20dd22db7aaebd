"""Keeps each collection's FAISS index in memory, checked against the database, saved atomically.

The database is the source of truth: an index file is a cache. On load it must carry the
collection's embedder version and exactly the database's id set (count and checksum), else it
is rebuilt from the embeddings table. Writes mark the index dirty; a saver thread checkpoints
dirty indexes at most every ``save_interval`` seconds, and ``flush`` saves at once.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.db import Database
from app.records import CollectionRecord, EmbeddingRecord, ImageRecord
from index import IndexCorrupt, VectorIndex, id_checksum

log = logging.getLogger(__name__)


def load_vectors(db: Database, *, collection_id: int, embedder_version: str) -> tuple[np.ndarray, np.ndarray]:
    """All stored vectors of one collection and version: ((n, d) float32 unit rows, (n,) int64 ids)."""
    stmt = (
        select(EmbeddingRecord.image_id, EmbeddingRecord.vector)
        .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
        .where(ImageRecord.collection_id == collection_id)
        .where(EmbeddingRecord.embedder_version == embedder_version)
        .order_by(EmbeddingRecord.image_id)
    )
    with db.session() as session:
        rows = session.execute(stmt).all()
    if not rows:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
    return vectors, ids


class IndexManager:
    def __init__(self, *, db: Database, index_dir: Path, save_interval: float = 2.0) -> None:
        self.db = db
        self.index_dir = index_dir
        self.save_interval = save_interval
        self._lock = threading.RLock()
        self._indexes: dict[int, VectorIndex] = {}
        self._dirty: set[int] = set()
        self._stop = threading.Event()
        self._saver: threading.Thread | None = None

    def path_for(self, collection_id: int) -> Path:
        return self.index_dir / f"collection-{collection_id}.cbidx"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._saver is None:
            self._saver = threading.Thread(target=self._save_loop, name="index-saver", daemon=True)
            self._saver.start()

    def stop(self) -> None:
        self._stop.set()
        if self._saver is not None:
            self._saver.join(timeout=10)
            self._saver = None
        self.flush_all()

    def _save_loop(self) -> None:
        while not self._stop.wait(self.save_interval):
            try:
                self.flush_all()
            except Exception:  # a failed checkpoint must not kill the saver; the DB still has it all
                log.exception("index checkpoint failed")

    # -- access ----------------------------------------------------------------------------
    def get(self, collection: CollectionRecord) -> VectorIndex | None:
        """The served index of a collection (None while it has no embedder version)."""
        if collection.embedder_version is None:
            return None
        with self._lock:
            index = self._indexes.get(collection.id)
            if index is not None and index.meta.get("embedder_version") == collection.embedder_version:
                return index
            index = self._load_or_rebuild(collection)
            self._indexes[collection.id] = index
            return index

    def _load_or_rebuild(self, collection: CollectionRecord) -> VectorIndex:
        version = collection.embedder_version
        assert version is not None
        vectors, ids = load_vectors(self.db, collection_id=collection.id, embedder_version=version)
        path = self.path_for(collection.id)
        try:
            index = VectorIndex.load(path)
            if index.meta.get("embedder_version") == version and index.id_checksum() == id_checksum(ids):
                log.info("index of %s loaded from %s (%d vectors)", collection.name, path, index.ntotal)
                return index
            log.warning("index file of %s is behind the database; rebuilding", collection.name)
        except FileNotFoundError:
            log.info("no index file for %s; building from the database", collection.name)
        except IndexCorrupt as exc:
            log.warning("index file of %s is unreadable (%s); rebuilding", collection.name, exc)
            path.replace(path.with_suffix(".corrupt"))
        index = VectorIndex(
            vectors.shape[1] if len(ids) else 1,
            factory=collection.index_factory,
            meta={"collection": collection.name, "embedder_version": version},
        )
        if len(ids):
            index.add(vectors, ids)
        index.save(path)
        return index

    def build(self, collection: CollectionRecord) -> VectorIndex:
        """Rebuild from the database now (after a re-embed or version switch) and save."""
        with self._lock:
            self._indexes.pop(collection.id, None)
            self.path_for(collection.id).unlink(missing_ok=True)
            index = self._load_or_rebuild(collection)
            self._indexes[collection.id] = index
            self._dirty.discard(collection.id)
            return index

    def add(self, collection: CollectionRecord, *, vectors: np.ndarray, ids: np.ndarray) -> None:
        index = self.get(collection)
        if index is None or len(ids) == 0:
            return
        if index.ntotal == 0 and index.dim != vectors.shape[1]:
            # An empty index is created before the dimension is known; recreate it with the right one.
            with self._lock:
                index = VectorIndex(vectors.shape[1], factory=index.factory, meta=index.meta)
                self._indexes[collection.id] = index
        index.add(vectors, ids)
        with self._lock:
            self._dirty.add(collection.id)

    def remove(self, collection: CollectionRecord, ids: np.ndarray) -> None:
        index = self.get(collection)
        if index is None:
            return
        if index.remove(ids):
            with self._lock:
                self._dirty.add(collection.id)

    def drop(self, collection_id: int) -> None:
        with self._lock:
            self._indexes.pop(collection_id, None)
            self._dirty.discard(collection_id)
            self.path_for(collection_id).unlink(missing_ok=True)

    def flush(self, collection_id: int) -> None:
        with self._lock:
            if collection_id not in self._dirty:
                return
            self._dirty.discard(collection_id)
            index = self._indexes.get(collection_id)
        if index is not None:
            index.save(self.path_for(collection_id))

    def flush_all(self) -> None:
        with self._lock:
            dirty = list(self._dirty)
        for collection_id in dirty:
            self.flush(collection_id)

    def size(self, collection: CollectionRecord) -> int:
        index = self._indexes.get(collection.id)
        return index.ntotal if index is not None else 0
