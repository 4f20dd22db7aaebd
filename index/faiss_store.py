"""The vector store in process: one ``VectorIndex`` per space, with the scalar fields beside it.

Filters run on the scalar columns here and become an id selector; a small filtered set (at most
``EXACT_PASS_MAX`` ids) is searched exactly over its vectors (``index.exact``), since a graph or IVF
search restricted to a few ids misses most of them. A kind that needs training serves exact search
(``Flat``) until the space holds enough vectors to train it, then is rebuilt into that kind, as the
service's index manager does. Spaces live in memory only: the manager's files stay the FAISS path's
persistence.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.exact import exact_search
from index.kinds import build_index, min_vectors, new_index, servable_factory, validate_factory
from index.rows import as_ids, as_vectors
from index.search_params import SearchKnobs
from index.store import SpaceMissing, UnsupportedKind, Where, check_rows, empty_hits
from index.vector_index import VectorIndex

__all__ = ["EXACT_PASS_MAX", "FaissStore"]

# Same bound as the service's exact pass (app/search/query.py): about a millisecond of brute force.
EXACT_PASS_MAX = 4096


@dataclass
class _Space:
    index: VectorIndex
    target: str  # the kind asked for; ``index`` serves Flat until it can be trained
    ids: np.ndarray  # (n,) int64 sorted; codes and created are parallel to it
    codes: np.ndarray  # (n,) int32: each row's label as its number in ``vocabulary``
    created: np.ndarray
    vocabulary: dict[str | None, int] = field(default_factory=dict)  # label -> code (only grows)

    def label_codes(self, labels: Any) -> np.ndarray:
        """The codes of ``labels`` (str or None), new labels numbered as they come."""
        return np.fromiter(
            (self.vocabulary.setdefault(label, len(self.vocabulary)) for label in labels),
            dtype=np.int32,
            count=len(labels),
        )

    def passing(self, where: Where) -> np.ndarray:
        """The sorted ids whose label and created time pass ``where``: one ``np.isin`` over the label
        codes (about 0.1 ms at 60,000 rows, against 2.3 ms testing each row's label in Python)."""
        keep = np.ones(self.ids.size, dtype=bool)
        if where.labels is not None:
            wanted = [self.vocabulary[label] for label in set(where.labels) if label in self.vocabulary]
            keep &= np.isin(self.codes, np.asarray(wanted, dtype=np.int32))
        if where.created_from is not None:
            keep &= self.created >= where.created_from
        if where.created_until is not None:
            keep &= self.created < where.created_until
        return self.ids[keep]


class FaissStore:
    """``index.store.VectorStore`` over in-process FAISS indexes; thread-safe."""

    backend = "faiss"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._spaces: dict[str, _Space] = {}
        self._aliases: dict[str, str] = {}  # alias -> the space it names

    def check_kind(self, kind: str, *, dim: int | None) -> None:
        try:
            validate_factory(kind, dim=dim)
        except ValueError as exc:
            raise UnsupportedKind(str(exc)) from None

    def create(self, space: str, *, dim: int, kind: str = "Flat") -> None:
        self.check_kind(kind, dim=dim)
        target = validate_factory(kind, dim=dim)
        with self._lock:
            if space in self._spaces or space in self._aliases:
                raise ValueError(f"space {space!r} exists")
            self._spaces[space] = _Space(
                index=new_index(dim, factory=servable_factory(target, 0)),
                target=target,
                ids=np.empty(0, np.int64),
                codes=np.empty(0, np.int32),
                created=np.empty(0, np.int64),
            )

    def exists(self, space: str) -> bool:
        with self._lock:
            return space in self._spaces or space in self._aliases

    def _get(self, space: str) -> _Space:
        found = self._spaces.get(self._aliases.get(space, space))
        if found is None:
            raise SpaceMissing(space)
        return found

    def upsert(
        self,
        space: str,
        *,
        ids: Any,
        vectors: Any,
        labels: Sequence[str | None] | None = None,
        created: Any | None = None,
    ) -> None:
        with self._lock:
            s = self._get(space)
            rows = check_rows(ids=ids, vectors=vectors, labels=labels, created=created, dim=s.index.dim)
            if rows.ids.size == 0:
                return
            self._remove(s, rows.ids)
            try:
                s.index.add(rows.vectors, rows.ids)
            except ValueError:
                # An id deleted from a kind that keeps tombstones (HNSW) cannot come back until the
                # index is rebuilt without them.
                self._rebuild(s, factory=s.index.factory)
                s.index.add(rows.vectors, rows.ids)
            ids_all = np.concatenate([s.ids, rows.ids])
            order = np.argsort(ids_all, kind="stable")
            s.ids = ids_all[order]
            s.codes = np.concatenate([s.codes, s.label_codes(rows.labels)])[order]
            s.created = np.concatenate([s.created, rows.created])[order]
            if s.index.factory != s.target and s.index.ntotal >= min_vectors(s.target):
                self._rebuild(s, factory=s.target)

    def _rebuild(self, s: _Space, *, factory: str) -> None:
        """``s.index`` rebuilt as ``factory`` from its own vectors (without its tombstones)."""
        live = s.index.ids()
        s.index = build_index(s.index.reconstruct(live), live, factory=factory)

    def _remove(self, s: _Space, ids: np.ndarray) -> None:
        s.index.remove(ids)
        keep = ~np.isin(s.ids, ids)
        s.ids, s.codes, s.created = s.ids[keep], s.codes[keep], s.created[keep]

    def delete(self, space: str, ids: Any) -> None:
        with self._lock:
            self._remove(self._get(space), np.unique(as_ids(ids)))

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
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")
        with self._lock:
            s = self._get(space)
            index = s.index
            arr = as_vectors(queries, index.dim)
            allowed = None if allowed_ids is None else np.unique(as_ids(allowed_ids))
            if where:
                passing = s.passing(where)
                allowed = passing if allowed is None else np.intersect1d(allowed, passing, assume_unique=True)
            exact = None
            if allowed is not None and allowed.size <= EXACT_PASS_MAX and index.kind != "Flat":
                allowed = allowed[index.contains_many(allowed)]
                try:
                    exact = index.reconstruct(allowed)
                except ValueError:
                    exact = None  # IVF kinds: the id selector below
        scores, found = empty_hits(arr.shape[0], int(k))
        if exact is not None and allowed is not None:
            got_scores, got_ids = exact_search(arr, int(k), vectors=exact, ids=allowed)
        else:
            got_scores, got_ids = index.search(arr, int(k), allowed_ids=allowed, knobs=knobs)
        scores[:, : got_ids.shape[1]] = got_scores
        found[:, : got_ids.shape[1]] = got_ids
        return scores, found

    def count(self, space: str) -> int:
        with self._lock:
            return self._get(space).index.ntotal

    def list_ids(self, space: str) -> np.ndarray:
        with self._lock:
            return self._get(space).index.ids()

    def point(self, alias: str, space: str) -> None:
        with self._lock:
            if alias in self._spaces:
                raise ValueError(f"alias {alias!r} conflicts with a space")
            if space not in self._spaces:
                raise SpaceMissing(space)
            self._aliases[alias] = space

    def target(self, alias: str) -> str | None:
        with self._lock:
            return self._aliases.get(alias)

    def drop(self, space: str) -> None:
        with self._lock:
            space = self._aliases.pop(space, space)
            self._spaces.pop(space, None)
            for alias in [a for a, named in self._aliases.items() if named == space]:
                del self._aliases[alias]

    def close(self) -> None:
        with self._lock:
            self._spaces.clear()
            self._aliases.clear()

    def spaces(self) -> list[str]:
        with self._lock:
            return sorted(self._spaces)

    def dim_of(self, space: str) -> int:
        with self._lock:
            return self._get(space).index.dim

    def flush(self, space: str) -> None:
        """In memory: nothing to seal."""

    def forget(self, space: str | None = None) -> None:
        """Nothing cached apart from the spaces themselves (one process holds them)."""

    def kind_of(self, space: str) -> str:
        """The kind serving ``space`` now (``Flat`` while its target kind waits for training data)."""
        with self._lock:
            return self._get(space).index.kind
