"""The vector store seam: one interface over FAISS in process (``index.faiss_store``) and Milvus
(``index.milvus_store``), so that the service can run on one machine or many with the same code.

A store holds named *spaces*, one per collection and embedder version (``space_name``). A space
holds unit-norm float32 vectors under non-negative int64 ids (the database's image ids), ranked by
inner product, with two scalar fields per id that filters run on inside the store: ``label`` (a
string or None) and ``created`` (int64 microseconds since the epoch, UTC).

The database stays the source of truth: a space is a cache, and ``reconcile`` brings it back in line
with the database's ids (the missing re-added from stored embeddings, the extra removed).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from index.rows import as_ids, as_vectors
from index.search_params import SearchKnobs

__all__ = [
    "Reconciled",
    "Rows",
    "SpaceMissing",
    "UnsupportedKind",
    "VectorStore",
    "Where",
    "check_rows",
    "empty_hits",
    "reconcile",
    "space_name",
]


class UnsupportedKind(ValueError):
    """An index kind this backend cannot build (the API answers 422, never a silent substitute)."""


class SpaceMissing(KeyError):
    """The space does not exist (never created, or dropped, possibly by another process)."""


@dataclass(frozen=True)
class Where:
    """Conditions that must all hold: the label one of ``labels`` (when given; None matches rows
    without a label), created at or after ``created_from`` and before ``created_until`` (int64
    microseconds since the epoch, UTC; None leaves that end open)."""

    labels: tuple[str | None, ...] | None = None
    created_from: int | None = None
    created_until: int | None = None

    def __bool__(self) -> bool:
        return self.labels is not None or self.created_from is not None or self.created_until is not None

    def matches(self, *, labels: np.ndarray, created: np.ndarray) -> np.ndarray:
        """(n,) bool over parallel arrays of labels (object) and created times (int64)."""
        keep = np.ones(len(created), dtype=bool)
        if self.labels is not None:
            wanted = set(self.labels)
            keep &= np.fromiter((label in wanted for label in labels), dtype=bool, count=len(labels))
        if self.created_from is not None:
            keep &= created >= self.created_from
        if self.created_until is not None:
            keep &= created < self.created_until
        return keep


@dataclass(frozen=True)
class Rows:
    """What a space stores per id: ``ids`` (n,) int64, ``vectors`` (n, d) float32 unit rows,
    ``labels`` (n,) object (str or None), ``created`` (n,) int64 microseconds."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    created: np.ndarray


def check_rows(
    *, ids: Any, vectors: Any, labels: Sequence[str | None] | None, created: Any | None, dim: int
) -> Rows:
    """The rows as a store takes them, or ``ValueError``: shapes agree, ids distinct and
    non-negative, vectors unit norm of dimension ``dim``; missing labels are None, missing
    created times 0."""
    id_arr = as_ids(ids)
    arr = as_vectors(vectors, dim)
    n = id_arr.size
    if arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} vectors but {n} ids")
    if np.unique(id_arr).size != n:
        raise ValueError("duplicate ids in batch")
    label_arr = np.empty(n, dtype=object)
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} ids")
        for i, label in enumerate(labels):
            if label is not None and not isinstance(label, str):
                raise ValueError(f"labels must be str or None; got {type(label).__name__}")
            label_arr[i] = label
    created_arr = np.zeros(n, dtype=np.int64) if created is None else np.asarray(created, dtype=np.int64)
    if created_arr.shape != (n,):
        raise ValueError(f"created must be ({n},) int64; got shape {created_arr.shape}")
    return Rows(ids=id_arr, vectors=arr, labels=label_arr, created=created_arr)


def empty_hits(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) scores of -inf and ids of -1: a search's answer before anything is found."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def space_name(*, collection_id: int, embedder_version: str, prefix: str = "cbir") -> str:
    """A space's name, valid as a Milvus collection name (``[A-Za-z_][A-Za-z0-9_]*``, at most 255):
    the collection id, a readable slug of the version and 8 hex of its SHA-256 (two versions that
    slug alike stay apart)."""
    slug = _UNSAFE.sub("_", embedder_version).strip("_")[:64]
    digest = hashlib.sha256(embedder_version.encode()).hexdigest()[:8]
    return f"{prefix}_c{int(collection_id)}_{slug}_{digest}"


@runtime_checkable
class VectorStore(Protocol):
    """What the service asks of a vector store. Vectors are (n, d) float32 rows of unit L2 norm;
    ids are (n,) non-negative int64; scores are inner products (cosine similarities)."""

    backend: str

    def check_kind(self, kind: str, *, dim: int | None) -> None:
        """``UnsupportedKind`` when this backend cannot build ``kind`` (a FAISS factory string such as
        ``Flat``, ``HNSW32``, ``IVF1024,SQ8``) for ``dim``-d vectors."""
        ...

    def create(self, space: str, *, dim: int, kind: str = "Flat") -> None:
        """Create ``space`` (``ValueError`` when it exists; ``UnsupportedKind`` as ``check_kind``)."""
        ...

    def exists(self, space: str) -> bool: ...

    def upsert(
        self,
        space: str,
        *,
        ids: Any,
        vectors: Any,
        labels: Sequence[str | None] | None = None,
        created: Any | None = None,
    ) -> None:
        """Store the rows, replacing those of ids already stored (``check_rows`` says what is taken)."""
        ...

    def delete(self, space: str, ids: Any) -> None:
        """Remove ``ids``; ids not stored are ignored."""
        ...

    def search(
        self,
        space: str,
        queries: Any,
        k: int,
        *,
        where: Where | None = None,
        allowed_ids: Any | None = None,
        knobs: SearchKnobs | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best ids per query row (n, d) among those that pass ``where`` and are in
        ``allowed_ids``: ((n, k) float32 scores best first, (n, k) int64 ids), empty slots -inf and -1.
        ``knobs`` (efSearch, nprobe) tune an approximate kind's search; None keeps the store's own.
        Every method that names a space raises ``SpaceMissing`` when it does not exist."""
        ...

    def count(self, space: str) -> int: ...

    def list_ids(self, space: str) -> np.ndarray:
        """Every stored id, (n,) int64 sorted ascending (for reconciliation)."""
        ...

    def drop(self, space: str) -> None:
        """Remove ``space`` and everything in it, with the aliases that name it (given an alias: the
        alias and the space it names); nothing when it does not exist."""
        ...

    def point(self, alias: str, space: str) -> None:
        """Make ``alias`` name ``space`` (created, or switched at once from the space it named):
        every call that takes a space takes ``alias`` too. ``ValueError`` when a space is called
        ``alias``; ``SpaceMissing`` when ``space`` does not exist."""
        ...

    def target(self, alias: str) -> str | None:
        """The space ``alias`` names; None when it is no alias."""
        ...

    def spaces(self) -> list[str]:
        """The names of every space the store holds (not their aliases), sorted."""
        ...

    def dim_of(self, space: str) -> int: ...

    def kind_of(self, space: str) -> str:
        """The kind ``space`` serves (a factory string without ``IDMap2,``)."""
        ...

    def flush(self, space: str) -> None:
        """Seal what was written (after a bulk load); nothing where there is nothing to seal."""
        ...

    def forget(self, space: str | None = None) -> None:
        """Drop what this client remembers of ``space`` (every space: None), such as its dimension and
        kind, so that the next call reads them from the store again (another process may have
        recreated it)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Reconciled:
    added: int
    removed: int


def reconcile(
    store: VectorStore,
    space: str,
    *,
    db_ids: Any,
    fetch: Callable[[np.ndarray], Rows],
    batch: int = 4096,
) -> Reconciled:
    """Bring ``space`` in line with the database's ``db_ids``: ids it lacks are re-added from
    ``fetch(ids)`` (the stored embeddings and scalar fields), in batches; ids the database no
    longer holds are deleted."""
    wanted = np.unique(as_ids(db_ids))
    held = store.list_ids(space)
    missing = np.setdiff1d(wanted, held, assume_unique=True)
    extra = np.setdiff1d(held, wanted, assume_unique=True)
    if extra.size:
        store.delete(space, extra)
    for start in range(0, missing.size, batch):
        rows = fetch(missing[start : start + batch])
        store.upsert(
            space, ids=rows.ids, vectors=rows.vectors, labels=list(rows.labels), created=rows.created
        )
    return Reconciled(added=int(missing.size), removed=int(extra.size))
