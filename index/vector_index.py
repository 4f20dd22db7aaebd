"""A FAISS vector index keyed by database image ids, with atomic, self-checking files.

Vectors are ``(n, d)`` float32 rows of unit L2 norm; the metric is inner product, so
scores are cosine similarities in ``[-1, 1]``. Ids are non-negative int64 (the
database's image ids); ``-1`` is FAISS's "no result" sentinel and never a valid id.

File format (version 1), little-endian::

    magic        8 bytes   b"CBIRVIX\\0"
    version      uint32    1
    header_len   uint32    length of the JSON header in bytes
    header_crc   uint32    zlib.crc32 of the JSON header
    header       JSON      {"dim", "factory", "metric", "meta", "ntotal", "id_checksum",
                            "payload_len", "payload_sha256"} and, optionally,
                           "tombstones" (ids deleted but still in the payload) and "hwm"
                           (the high-water mark: the largest id ever added)
    payload      bytes     faiss.serialize_index(index), exactly payload_len bytes

``ntotal`` and ``id_checksum`` describe the live ids (the payload's ids minus the tombstones).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

__all__ = [
    "IndexCorrupt",
    "SearchKnobs",
    "VectorIndex",
    "id_checksum",
    "normalise_factory",
    "stale_temp_files",
]

MAGIC = b"CBIRVIX\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIII")  # magic, version, header_len, header_crc
_MAX_HEADER_LEN = 16 * 1024 * 1024
_UNIT_NORM_TOL = 1e-3
_MASK64 = (1 << 64) - 1
_INT64_MAX = np.iinfo(np.int64).max


class IndexCorrupt(Exception):
    """A file that cannot be read as a cbir vector index (wrong magic, torn, tampered)."""


def _mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of int64 ids, as uint64 (array ops wrap silently)."""
    z = ids.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_parts(ids: np.ndarray) -> tuple[int, int]:
    """(sum mod 2**64, xor) of mixed ids: the incremental parts of the checksum."""
    if ids.size == 0:
        return 0, 0
    mixed = _mix64(ids)
    return int(np.add.reduce(mixed, dtype=np.uint64)), int(np.bitwise_xor.reduce(mixed))


def _format_checksum(count: int, total: int, xor: int) -> str:
    return f"{count}:{total & _MASK64:016x}{xor:016x}"


def id_checksum(ids: Any) -> str:
    """Order-independent fingerprint of a set of int64 ids, e.g. ``"3:9f...e1"``.

    The same function backs ``VectorIndex.id_checksum()``, so the service can compute it
    from the database's ids and compare. ``ids`` must be unique (it is a set fingerprint).
    """
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    total, xor = _mix_parts(arr)
    return _format_checksum(arr.size, total, xor)


def _as_vectors(vectors: Any, dim: int) -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, {dim}); got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"vectors have dimension {arr.shape[1]}; this index has {dim}")
    if arr.dtype.kind != "f":
        raise ValueError(f"vectors must be floating point; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise ValueError(f"vectors contain NaN or inf (rows {bad[:10].tolist()})")
    if arr.shape[0]:
        norms = np.linalg.norm(arr, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > _UNIT_NORM_TOL)
        if bad.size:
            raise ValueError(
                f"vectors must be L2-normalised; rows {bad[:10].tolist()} have norms "
                f"{norms[bad[:10]].round(4).tolist()}"
            )
    return arr


def _as_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers; got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:
        raise ValueError("ids must fit in int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if int(arr.min()) < 0:
        raise ValueError("ids must be non-negative (-1 is FAISS's 'no result' marker)")
    return arr


def normalise_factory(factory: str) -> str:
    """``factory`` with spaces dropped and wrapped as ``IDMap2,<factory>`` unless already id-mapped."""
    factory = "".join(factory.split())
    return factory if factory.startswith("IDMap") else f"IDMap2,{factory}"


_normalise_factory = normalise_factory


@dataclass(frozen=True)
class SearchKnobs:
    """Search-time parameters of approximate kinds; ``None`` keeps the index's own setting.

    ``ef_search``: HNSW candidate list size; ``nprobe``: IVF lists visited; ``k_factor``: how many
    times ``k`` candidates an exact re-ranking stage (``...,RFlat``) re-scores.
    """

    ef_search: int | None = None
    nprobe: int | None = None
    k_factor: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.ef_search, self.nprobe, self.k_factor))

    def merged(self, override: SearchKnobs | None) -> SearchKnobs:
        """These knobs with every non-None field of ``override`` taking precedence."""
        if override is None:
            return self
        return SearchKnobs(
            ef_search=override.ef_search if override.ef_search is not None else self.ef_search,
            nprobe=override.nprobe if override.nprobe is not None else self.nprobe,
            k_factor=override.k_factor if override.k_factor is not None else self.k_factor,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class _RWLock:
    """Many readers (searches) or one writer (add, remove, save); writers are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


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
        factory = _normalise_factory(factory)
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
        self._lock = _RWLock()
        self._ids = np.sort(ids)  # sorted copy of the live ids, for membership checks
        self._id_sum, self._id_xor = _mix_parts(ids)
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
        arr = _as_vectors(arr, self.dim)
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
            return _format_checksum(self._ids.size, self._id_sum, self._id_xor)

    def search_knobs(self) -> SearchKnobs:
        """The index's own search parameters (those a search without overrides uses)."""
        knobs: dict[str, Any] = {}
        for part in _parts(faiss.downcast_index(self._index.index)):
            if isinstance(part, faiss.IndexHNSW):
                knobs["ef_search"] = int(part.hnsw.efSearch)
            elif isinstance(part, faiss.IndexIVF):
                knobs["nprobe"] = int(part.nprobe)
            elif isinstance(part, faiss.IndexRefine):
                knobs["k_factor"] = float(part.k_factor)
        return SearchKnobs(**knobs)

    def set_search_knobs(self, knobs: SearchKnobs) -> None:
        """Make ``knobs`` (its non-None fields) the index's own search parameters; saved with it."""
        with self._lock.write():
            for part in _parts(faiss.downcast_index(self._index.index)):
                if isinstance(part, faiss.IndexHNSW) and knobs.ef_search is not None:
                    part.hnsw.efSearch = int(knobs.ef_search)
                elif isinstance(part, faiss.IndexIVF) and knobs.nprobe is not None:
                    part.nprobe = int(knobs.nprobe)
                elif isinstance(part, faiss.IndexRefine) and knobs.k_factor is not None:
                    part.k_factor = float(knobs.k_factor)

    def memory_bytes(self) -> int:
        """Rough estimate of resident bytes: codes, graph links, coarse centroids and id maps."""
        with self._lock.read():
            n = int(self._index.ntotal)
            inner = faiss.downcast_index(self._index.index)
            code = _code_size(inner, self.dim)
            extra = 0
            for part in _parts(inner):
                hnsw = getattr(part, "hnsw", None)
                if hnsw is not None:
                    extra += int(hnsw.neighbors.size()) * 4 + int(hnsw.levels.size()) * 4
                if isinstance(part, faiss.IndexIVF):
                    extra += int(part.nlist) * self.dim * 4 + n * 8  # centroids, ids in the lists
                if isinstance(part, faiss.IndexRefine):
                    extra += n * _code_size(faiss.downcast_index(part.refine_index), self.dim)
            # per id: IDMap2's id_map (8) + its reverse hash map (~32) + our sorted copy (8)
            return n * (code + 48) + extra

    # --- mutation ---------------------------------------------------------------------

    def add(self, vectors: Any, ids: Any) -> None:
        """Store ``vectors`` (n, d) float-convertible, unit L2 norm, under ``ids`` (n,) int64.

        Raises ``ValueError`` (and stores nothing) on a wrong shape or dimension, non-finite
        or non-unit rows, negative or duplicate ids, or ids already stored (or deleted and
        awaiting a rebuild).
        """
        arr = _as_vectors(vectors, self.dim)
        id_arr = _as_ids(ids)
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
            total, xor = _mix_parts(uniq)
            self._id_sum = (self._id_sum + total) & _MASK64
            self._id_xor ^= xor
            self._hwm = max(self._hwm, int(uniq[-1]))

    def remove(self, ids: Any) -> int:
        """Remove ``ids`` (n,) int64 at once; ids not stored are ignored. Returns how many were removed.

        Kinds FAISS cannot remove from (HNSW, exact re-ranking) keep the vectors as tombstones,
        which every search excludes, until the index is rebuilt.
        """
        id_arr = np.unique(_as_ids(ids))
        with self._lock.write():
            present = id_arr[np.isin(id_arr, self._ids, assume_unique=True)]
            if present.size == 0:
                return 0
            try:
                self._index.remove_ids(present)
            except RuntimeError:
                self._tombstones = np.union1d(self._tombstones, present)
            self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
            total, xor = _mix_parts(present)
            self._id_sum = (self._id_sum - total) & _MASK64
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
        arr = _as_vectors(vectors, self.dim)
        allowed = None if allowed_ids is None else _as_ids(allowed_ids)
        with self._lock.read():
            m = min(int(k), int(self._ids.size))
            if allowed is not None:
                m = min(m, int(allowed.size))
            if m == 0 or arr.shape[0] == 0:
                shape = (arr.shape[0], m)
                return np.empty(shape, np.float32), np.empty(shape, np.int64)
            keep: list[Any] = []  # FAISS holds raw pointers: keep every selector alive until done
            selector = _selector(allowed=allowed, tombstones=self._tombstones, keep=keep)
            params = None
            if selector is not None or knobs:
                params = _search_parameters(self._index, selector, knobs=knobs or SearchKnobs(), keep=keep)
            scores, found = self._index.search(arr, m, params=params)
        scores = np.asarray(scores, dtype=np.float32)
        found = np.asarray(found, dtype=np.int64)
        scores[found < 0] = -np.inf  # FAISS fills gaps with -FLT_MAX for inner product
        return scores, found

    # --- persistence ------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, on_stage: Callable[[str], None] | None = None) -> None:
        """Atomically write the index to ``path``: the old file or the new one, never a torn one.

        The temporary file beside it is named ``.<name>.<pid>.<random>.tmp``, so that a later
        process can tell (``stale_temp_files``) which ones a dead writer left. ``on_stage`` is
        called with ``"half_written"`` and ``"replaced"`` (the crash tests' fault seam).
        """
        path = Path(path)
        with self._lock.write():
            payload = faiss.serialize_index(self._index)
            header = {
                "dim": self.dim,
                "factory": self._factory,
                "metric": "inner_product",
                "meta": json.loads(self._meta_json),
                "ntotal": int(self._ids.size),
                "id_checksum": _format_checksum(self._ids.size, self._id_sum, self._id_xor),
                "tombstones": self._tombstones.tolist(),
                "hwm": self._hwm,
                "payload_len": int(payload.nbytes),
            }
        header["payload_sha256"] = hashlib.sha256(payload.data).hexdigest()
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes))

        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(prefix)
                f.write(header_bytes)
                half = payload.nbytes // 2
                f.write(payload.data[:half])
                if on_stage is not None:
                    f.flush()
                    on_stage("half_written")
                f.write(payload.data[half:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        if on_stage is not None:
            on_stage("replaced")
        _fsync_dir(directory)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VectorIndex:
        """Read a file written by ``save``; ``IndexCorrupt`` if anything about it is off.

        A missing file raises ``FileNotFoundError`` (not corruption: there is nothing yet).
        """
        data = Path(path).read_bytes()
        where = f"{os.fspath(path)!r}"
        if len(data) < _PREFIX.size:
            raise IndexCorrupt(f"{where}: {len(data)} bytes is too short to be an index file")
        magic, version, header_len, header_crc = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise IndexCorrupt(f"{where}: not a cbir index file (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise IndexCorrupt(
                f"{where}: format version {version} is not supported (expected {FORMAT_VERSION})"
            )
        header_end = _PREFIX.size + header_len
        if header_len > _MAX_HEADER_LEN or header_end > len(data):
            raise IndexCorrupt(f"{where}: truncated header ({header_len} bytes declared)")
        header_bytes = data[_PREFIX.size : header_end]
        if zlib.crc32(header_bytes) != header_crc:
            raise IndexCorrupt(f"{where}: header checksum mismatch")
        header = _parse_header(header_bytes, where=where)

        payload = memoryview(data)[header_end:]
        if len(payload) != header["payload_len"]:
            raise IndexCorrupt(
                f"{where}: payload is {len(payload)} bytes, header says {header['payload_len']}"
                " (truncated or padded)"
            )
        if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
            raise IndexCorrupt(f"{where}: payload checksum mismatch")
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except Exception as exc:  # FAISS reports any read failure as RuntimeError
            raise IndexCorrupt(f"{where}: FAISS cannot read the payload: {exc}") from exc
        del data, payload

        if not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
            kind = type(index).__name__
            raise IndexCorrupt(f"{where}: payload is {kind}, not an id-mapped index")
        if index.d != header["dim"]:
            raise IndexCorrupt(f"{where}: payload dimension {index.d} != header {header['dim']}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexCorrupt(f"{where}: payload metric is not inner product")
        stored = faiss.vector_to_array(index.id_map).astype(np.int64)
        tombstones = _tombstones(header.get("tombstones", []), where=where)
        if stored.size != index.ntotal:
            raise IndexCorrupt(f"{where}: id map is inconsistent")
        stored.sort()
        if stored.size > 1 and bool((stored[1:] == stored[:-1]).any()):
            raise IndexCorrupt(f"{where}: id map holds duplicate ids")
        if tombstones.size and not np.isin(tombstones, stored, assume_unique=True).all():
            raise IndexCorrupt(f"{where}: tombstones name ids the payload does not hold")
        ids = np.setdiff1d(stored, tombstones, assume_unique=True) if tombstones.size else stored
        if ids.size != header["ntotal"]:
            raise IndexCorrupt(f"{where}: payload holds {ids.size} live ids, header {header['ntotal']}")
        if id_checksum(ids) != header["id_checksum"]:
            raise IndexCorrupt(f"{where}: id checksum mismatch")

        self = cls.__new__(cls)
        hwm = header.get("hwm", -1)
        self._setup(
            index=index,
            factory=header["factory"],
            meta=header["meta"],
            ids=ids,
            tombstones=tombstones,
            hwm=hwm if isinstance(hwm, int) else -1,
        )
        return self


def _tombstones(value: Any, *, where: str) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise IndexCorrupt(f"{where}: header field 'tombstones' must be a list of ids")
    return np.unique(np.asarray(value, dtype=np.int64))


def _parts(index: Any) -> Iterator[Any]:
    """``index`` and the FAISS indexes nested in it (pre-transforms, re-ranking bases), downcast."""
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexPreTransform):
        yield from _parts(index.index)
    elif isinstance(index, faiss.IndexRefine):
        yield from _parts(index.base_index)


def _selector(*, allowed: np.ndarray | None, tombstones: np.ndarray, keep: list[Any]) -> Any | None:
    """The ids a search may return: ``allowed`` (all when None) minus ``tombstones``."""
    selector: Any = None
    if allowed is not None:
        selector = faiss.IDSelectorBatch(allowed)
        keep.append(selector)
    if tombstones.size:
        buried = faiss.IDSelectorBatch(tombstones)
        alive = faiss.IDSelectorNot(buried)
        keep.extend((buried, alive))
        if selector is not None:
            both = faiss.IDSelectorAnd(selector, alive)
            keep.append(both)
            selector = both
        else:
            selector = alive
    return selector


def _search_parameters(index: Any, selector: Any, *, knobs: SearchKnobs, keep: list[Any]) -> Any:
    """Search parameters for an id-mapped ``index``: ``selector`` (over our ids) and ``knobs``,
    of the types the nested indexes expect (IVF and HNSW refuse the base class), with each
    index's own settings kept where ``knobs`` leaves them.

    The id map translates the top-level selector to its internal positions; nested parameters
    (a re-ranking base, a pre-transformed index) are not translated by FAISS, so they get an
    ``IDSelectorTranslated`` over the same id map."""
    translated = None
    if selector is not None:
        translated = faiss.IDSelectorTranslated(index.id_map, selector)
        keep.append(translated)
    params = _params_for(index.index, translated, knobs=knobs, keep=keep)
    params.sel = selector
    return params


def _params_for(index: Any, selector: Any | None, *, knobs: SearchKnobs, keep: list[Any]) -> Any:
    swig: Any = faiss  # the SWIG stubs miss these keyword constructors
    inner = faiss.downcast_index(index)
    params: Any
    if isinstance(inner, faiss.IndexRefine):
        base = _params_for(inner.base_index, selector, knobs=knobs, keep=keep)
        k_factor = knobs.k_factor if knobs.k_factor is not None else inner.k_factor
        params = swig.IndexRefineSearchParameters(k_factor=float(k_factor), base_index_params=base)
    elif isinstance(inner, faiss.IndexPreTransform):
        sub = _params_for(inner.index, selector, knobs=knobs, keep=keep)
        params = swig.SearchParametersPreTransform(index_params=sub)
    elif isinstance(inner, faiss.IndexIVF):
        nprobe = knobs.nprobe if knobs.nprobe is not None else inner.nprobe
        params = swig.SearchParametersIVF(nprobe=int(min(nprobe, inner.nlist)))
    elif isinstance(inner, faiss.IndexHNSW):
        ef = knobs.ef_search if knobs.ef_search is not None else inner.hnsw.efSearch
        params = swig.SearchParametersHNSW(efSearch=int(ef))
    else:
        params = swig.SearchParameters()
    if selector is not None:
        params.sel = selector
    keep.append(params)
    return params


def _parse_header(header_bytes: bytes, *, where: str) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexCorrupt(f"{where}: header is not valid JSON: {exc}") from exc
    expected: dict[str, type | tuple[type, ...]] = {
        "dim": int,
        "factory": str,
        "metric": str,
        "meta": dict,
        "ntotal": int,
        "id_checksum": str,
        "payload_len": int,
        "payload_sha256": str,
    }
    if not isinstance(header, dict):
        raise IndexCorrupt(f"{where}: header is not a JSON object")
    for key, kind in expected.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise IndexCorrupt(f"{where}: header field {key!r} missing or of the wrong type")
    if header["metric"] != "inner_product":
        raise IndexCorrupt(f"{where}: unsupported metric {header['metric']!r}")
    return header


def _code_size(index: faiss.Index, dim: int) -> int:
    """Bytes per stored vector, falling back to float32 rows when FAISS cannot say."""
    try:
        return int(index.sa_code_size())
    except RuntimeError:
        storage = getattr(index, "storage", None)
        if storage is not None:
            return _code_size(faiss.downcast_index(storage), dim)
        return dim * 4


_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")  # .<name>.<pid>.<random>.tmp
_LOADED_AT = time.time()  # files this pid wrote before it are a previous process's (pid reuse)


def stale_temp_files(directory: str | os.PathLike[str], *, unnamed_age: float = 3600.0) -> list[Path]:
    """Temporary files of ``save`` in ``directory`` that no live writer will rename: their writer
    was killed mid-save. A name without a pid (older versions) counts after ``unnamed_age`` s."""
    folder = Path(directory)
    stale = []
    for path in folder.glob(".*.tmp") if folder.is_dir() else []:
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        match = _TEMP_NAME.match(path.name)
        if match is None:
            if time.time() - mtime > unnamed_age:
                stale.append(path)
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            if mtime < _LOADED_AT:
                stale.append(path)
        elif not _alive(pid):
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; directories cannot be opened for fsync on Windows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
