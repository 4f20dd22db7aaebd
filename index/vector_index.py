"""A FAISS vector index keyed by database image ids, with atomic, self-checking files.

Vectors are ``(n, d)`` float32 rows of unit L2 norm; the metric is inner product, so
scores are cosine similarities in ``[-1, 1]``. Ids are non-negative int64 (the
database's image ids); ``-1`` is FAISS's "no result" sentinel and never a valid id.
The file format is ``index.fileformat``'s; search parameters and id selectors are
``index.search_params``'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from index.checksum import MASK64, format_checksum, mix_parts
from index.factories import normalise_factory
from index.fileformat import read_index, write_index
from index.rows import as_ids, as_vectors
from index.rwlock import RWLock
from index.search_params import SearchKnobs, apply_knobs, parts, read_knobs, search_parameters, selector
from index.threads import search_threads

__all__ = ["VectorIndex"]


class VectorIndex:
    """FAISS inner-product index over unit-norm float32 vectors, keyed by int64 ids.

    ``factory`` is any FAISS factory string (``Flat``, ``HNSW32``, ``IVF1024,PQ32``,
    ``OPQ16,IVF1024,PQ16``, ``IVF1024,PQ32,RFlat``); one that does not start with ``IDMap`` is
    wrapped as ``IDMap2,<factory>`` so every index takes our ids. A kind that needs training
    (IVF, PQ, OPQ) is trained on the first non-empty batch given to ``add`` (``build`` trains on a
    sample of everything it is given), which must be large enough for FAISS (else ``ValueError``).

    ``remove`` deletes at once: through FAISS where the kind supports it, else (HNSW, re-ranked
    kinds) by a tombstone that every search excludes with an id selector; ``tombstones`` says how
    many wait for a rebuild. ``meta`` is a JSON-serialisable dict saved with the file.

    Thread-safe: searches run concurrently (FAISS releases the GIL); add, remove and save take
    the lock alone, since FAISS add racing search is unsafe.
    """

    def __init__(self, dim: int, *, factory: str = "IDMap2,Flat", meta: dict[str, Any] | None = None) -> None:
        if not isinstance(dim, int | np.integer) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive integer; got {dim!r}")
        factory = normalise_factory(factory)
        try:
            index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"FAISS cannot build factory {factory!r}: {exc}") from exc
        self._setup(index=index, factory=factory, meta=meta, ids=np.empty(0, dtype=np.int64))

    def _setup(
        self,
        *,
        index: faiss.Index,
        factory: str,
        meta: dict[str, Any] | None,
        ids: np.ndarray,
        tombstones: np.ndarray | None = None,
        hwm: int = -1,
    ) -> None:
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict; got {type(meta).__name__}")
        try:
            self._meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta must be JSON-serialisable: {exc}") from exc
        # Any: FAISS's SWIG stubs miss the numpy overloads (remove_ids(array), ...) and .index.
        self._index: Any = index
        self._factory = factory
        self._lock = RWLock()
        self._ids = np.sort(ids)  # sorted copy of the live ids, for membership checks
        self._id_sum, self._id_xor = mix_parts(ids)
        # Ids deleted from a kind FAISS cannot remove from: still in the payload, never returned.
        self._tombstones = np.sort(tombstones) if tombstones is not None else np.empty(0, np.int64)
        self._hwm = max(hwm, int(ids.max()) if ids.size else -1)

    # --- construction -----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        vectors: Any,
        ids: Any,
        *,
        factory: str = "IDMap2,Flat",
        meta: dict[str, Any] | None = None,
        train_size: int = 100_000,
        seed: int = 0,
    ) -> VectorIndex:
        """A new index of dimension d holding ``vectors`` (n, d), unit norm, under ``ids`` (n,).

        A kind that needs training is trained on at most ``train_size`` of the rows (a seeded
        random sample), then all rows are added.
        """
        arr = np.asarray(vectors)
        if arr.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, d); got shape {arr.shape}")
        index = cls(int(arr.shape[1]), factory=factory, meta=meta)
        if arr.shape[0] and not index.is_trained:
            index.train(arr, sample=train_size, seed=seed)
        index.add(arr, ids)
        return index

    def train(self, vectors: Any, *, sample: int = 100_000, seed: int = 0) -> None:
        """Train the quantisers on ``vectors`` (n, d) unit rows, or a seeded sample of ``sample`` of them."""
        arr = np.asarray(vectors)
        if arr.ndim == 2 and arr.shape[0] > sample:
            rows = np.sort(np.random.default_rng(seed).choice(arr.shape[0], size=sample, replace=False))
            arr = arr[rows]
        arr = as_vectors(arr, self.dim)
        with self._lock.write():
            try:
                self._index.train(arr)
            except RuntimeError as exc:
                raise ValueError(
                    f"training {self._factory!r} on {arr.shape[0]} vectors failed: {exc}"
                ) from exc

    # --- properties -------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def factory(self) -> str:
        """The FAISS factory string, always starting with ``IDMap``."""
        return self._factory

    @property
    def kind(self) -> str:
        """The factory string without the id map: ``Flat``, ``HNSW32``, ``IVF1024,PQ32``, ..."""
        return self._factory.split(",", 1)[1] if "," in self._factory else self._factory

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def meta(self) -> dict[str, Any]:
        """A fresh copy of the metadata dict."""
        result: dict[str, Any] = json.loads(self._meta_json)
        return result

    def update_meta(self, **values: Any) -> None:
        """Merge ``values`` (JSON-serialisable) into the metadata saved with the file."""
        meta = {**self.meta, **values}
        try:
            self._meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta must be JSON-serialisable: {exc}") from exc

    @property
    def ntotal(self) -> int:
        """How many live vectors (deleted ones awaiting a rebuild not counted)."""
        return int(self._ids.size)

    @property
    def tombstones(self) -> int:
        """How many deleted vectors are still in the FAISS payload (excluded from every search)."""
        return int(self._tombstones.size)

    @property
    def high_water_mark(self) -> int:
        """The largest id ever added (-1 when none): a checkpoint holds every write up to it."""
        return self._hwm

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, factory={self._factory!r}, ntotal={self.ntotal})"

    def contains(self, id: int) -> bool:
        """Whether ``id`` is stored."""
        ids = self._ids
        pos = int(np.searchsorted(ids, id))
        return pos < ids.size and int(ids[pos]) == id

    def contains_many(self, ids: Any) -> np.ndarray:
        """A boolean per id: whether it is stored (a binary search each, no copy of the id set)."""
        query = np.asarray(ids, dtype=np.int64)
        stored = self._ids
        if stored.size == 0:
            return np.zeros(query.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(stored, query), stored.size - 1)
        return stored[pos] == query

    def ids(self) -> np.ndarray:
        """The stored ids, sorted ascending, as a (ntotal,) int64 copy."""
        return self._ids.copy()

    def id_checksum(self) -> str:
        """Fingerprint of the stored id set; equals ``id_checksum(db_ids)`` iff same set (whp)."""
        with self._lock.read():
            return format_checksum(self._ids.size, self._id_sum, self._id_xor)

    def search_knobs(self) -> SearchKnobs:
        """The index's own search parameters (those a search without overrides uses)."""
        return read_knobs(self._index.index)

    def set_search_knobs(self, knobs: SearchKnobs) -> None:
        """Make ``knobs`` (its non-None fields) the index's own search parameters; saved with it."""
        with self._lock.write():
            apply_knobs(self._index.index, knobs)

    def memory_bytes(self) -> int:
        """Rough estimate of resident bytes: codes, graph links, coarse centroids and id maps."""
        with self._lock.read():
            n = int(self._index.ntotal)
            inner = faiss.downcast_index(self._index.index)
            code = _code_size(inner, self.dim)
            extra = 0
            for part in parts(inner):
                hnsw = getattr(part, "hnsw", None)
                if hnsw is not None:
                    extra += int(hnsw.neighbors.size()) * 4 + int(hnsw.levels.size()) * 4
                if isinstance(part, faiss.IndexIVF):
                    extra += int(part.nlist) * self.dim * 4 + n * 8  # centroids, ids in the lists
                if isinstance(part, faiss.IndexRefine):
                    extra += n * _code_size(faiss.downcast_index(part.refine_index), self.dim)
            # per id: IDMap2's id_map (8) + its reverse hash map (~32) + our sorted copy (8)
            return n * (code + 48) + extra

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids`` (n,) int64 as (n, d) float32, approximate for lossy codes;
        ``ValueError`` when an id is not stored or the kind cannot give vectors back (IVF kinds)."""
        id_arr = as_ids(ids)
        with self._lock.read():
            if not self.contains_many(id_arr).all():
                raise ValueError("some ids are not stored")
            if id_arr.size == 0:
                return np.empty((0, self.dim), dtype=np.float32)
            try:
                return np.asarray(self._index.reconstruct_batch(id_arr), dtype=np.float32)
            except RuntimeError as exc:
                raise ValueError(
                    f"{self.kind} cannot give its vectors back: {str(exc).strip()[:120]}"
                ) from None

    # --- mutation ---------------------------------------------------------------------

    def add(self, vectors: Any, ids: Any) -> None:
        """Store ``vectors`` (n, d) float-convertible, unit L2 norm, under ``ids`` (n,) int64.

        Raises ``ValueError`` (and stores nothing) on a wrong shape or dimension, non-finite
        or non-unit rows, negative or duplicate ids, or ids already stored (or deleted and
        awaiting a rebuild).
        """
        arr = as_vectors(vectors, self.dim)
        id_arr = as_ids(ids)
        if id_arr.size != arr.shape[0]:
            raise ValueError(f"got {arr.shape[0]} vectors but {id_arr.size} ids")
        if arr.shape[0] == 0:
            return
        uniq, counts = np.unique(id_arr, return_counts=True)
        if uniq.size != id_arr.size:
            raise ValueError(f"duplicate ids in batch: {uniq[counts > 1][:10].tolist()}")
        with self._lock.write():
            present = uniq[np.isin(uniq, self._ids, assume_unique=True)]
            if present.size:
                raise ValueError(f"ids already in the index: {present[:10].tolist()}")
            buried = uniq[np.isin(uniq, self._tombstones, assume_unique=True)]
            if buried.size:
                raise ValueError(f"ids deleted and awaiting a rebuild: {buried[:10].tolist()}")
            if not self._index.is_trained:
                try:
                    self._index.train(arr)
                except RuntimeError as exc:
                    raise ValueError(
                        f"training {self._factory!r} on the first batch of {arr.shape[0]} "
                        f"vectors failed: {exc}"
                    ) from exc
            self._index.add_with_ids(arr, id_arr)
            self._ids = np.union1d(self._ids, uniq)
            total, xor = mix_parts(uniq)
            self._id_sum = (self._id_sum + total) & MASK64
            self._id_xor ^= xor
            self._hwm = max(self._hwm, int(uniq[-1]))

    def remove(self, ids: Any) -> int:
        """Remove ``ids`` (n,) int64 at once; ids not stored are ignored. Returns how many were removed.

        Kinds FAISS cannot remove from (HNSW, exact re-ranking) keep the vectors as tombstones,
        which every search excludes, until the index is rebuilt.
        """
        id_arr = np.unique(as_ids(ids))
        with self._lock.write():
            present = id_arr[np.isin(id_arr, self._ids, assume_unique=True)]
            if present.size == 0:
                return 0
            try:
                self._index.remove_ids(present)
            except RuntimeError:
                self._tombstones = np.union1d(self._tombstones, present)
            self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
            total, xor = mix_parts(present)
            self._id_sum = (self._id_sum - total) & MASK64
            self._id_xor ^= xor
            return int(present.size)

    # --- search -----------------------------------------------------------------------

    def search(
        self,
        vectors: Any,
        k: int,
        *,
        allowed_ids: Any | None = None,
        knobs: SearchKnobs | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best stored ids for each query row.

        ``vectors`` is (n, d) float, unit L2 norm. Returns ``(scores, ids)``: scores
        (n, m) float32 inner products (cosine similarity), best first; ids (n, m) int64,
        where ``m = min(k, ntotal)``. So an empty index gives (n, 0) arrays. With an exact
        (Flat) index every slot is filled; an approximate index may leave trailing slots
        unfilled, and those hold id ``-1`` and score ``-inf``.

        ``allowed_ids`` (int64, any order) restricts the search to those ids (a FAISS
        ``IDSelectorBatch``): the best ``k`` among them, exact for a Flat index; then
        ``m = min(k, ntotal, len(allowed_ids))`` and slots beyond the matches hold ``-1``.
        ``knobs`` overrides the index's search parameters (efSearch, nprobe, k_factor) for
        this search only.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")
        arr = as_vectors(vectors, self.dim)
        allowed = None if allowed_ids is None else as_ids(allowed_ids)
        with self._lock.read():
            m = min(int(k), int(self._ids.size))
            if allowed is not None:
                m = min(m, int(allowed.size))
            if m == 0 or arr.shape[0] == 0:
                shape = (arr.shape[0], m)
                return np.empty(shape, np.float32), np.empty(shape, np.int64)
            keep: list[Any] = []  # FAISS holds raw pointers: keep every selector alive until done
            chosen = selector(allowed=allowed, tombstones=self._tombstones, keep=keep)
            params = None
            if chosen is not None or knobs:
                params = search_parameters(self._index, chosen, knobs=knobs or SearchKnobs(), keep=keep)
            with search_threads(arr.shape[0]):  # a batch of queries on every core
                scores, found = self._index.search(arr, m, params=params)
        scores = np.asarray(scores, dtype=np.float32)
        found = np.asarray(found, dtype=np.int64)
        scores[found < 0] = -np.inf  # FAISS fills gaps with -FLT_MAX for inner product
        return scores, found

    # --- persistence ------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, on_stage: Callable[[str], None] | None = None) -> None:
        """Atomically write the index to ``path`` (``index.fileformat.write_index``): the old file or
        the new one, never a torn one. ``on_stage`` is called with ``"half_written"`` and
        ``"replaced"`` (the crash tests' fault seam)."""
        with self._lock.write():
            payload = faiss.serialize_index(self._index)
            header = {
                "dim": self.dim,
                "factory": self._factory,
                "metric": "inner_product",
                "meta": json.loads(self._meta_json),
                "ntotal": int(self._ids.size),
                "id_checksum": format_checksum(self._ids.size, self._id_sum, self._id_xor),
                "tombstones": self._tombstones.tolist(),
                "hwm": self._hwm,
            }
        write_index(path, header=header, payload=payload, on_stage=on_stage)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VectorIndex:
        """Read a file written by ``save``; ``IndexCorrupt`` if anything about it is off.

        A missing file raises ``FileNotFoundError`` (not corruption: there is nothing yet).
        """
        found = read_index(path)
        self = cls.__new__(cls)
        self._setup(
            index=found.index,
            factory=found.header["factory"],
            meta=found.header["meta"],
            ids=found.ids,
            tombstones=found.tombstones,
            hwm=found.hwm,
        )
        return self


def _code_size(index: faiss.Index, dim: int) -> int:
    """Bytes per stored vector, falling back to float32 rows when FAISS cannot say."""
    try:
        return int(index.sa_code_size())
    except RuntimeError:
        storage = getattr(index, "storage", None)
        if storage is not None:
            return _code_size(faiss.downcast_index(storage), dim)
        return dim * 4
