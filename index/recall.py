"""Recall@k of an index against exact search, with held-out queries.

The queries are a seeded sample of the stored vectors, each held out from its own search: both the
exact top k and the index's answer are taken k + 1 deep and the query's own id is dropped from both,
so that no query counts itself as a hit (with the stored vectors as plain queries, each query's own
id is a free hit: up to 1/k of the score). FAISS's benchmarks query with vectors apart from the
database for the same reason.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from index.exact import exact_knn
from index.search_params import SearchKnobs

__all__ = ["Searchable", "recall_at_k"]


class Searchable(Protocol):
    """What recall is measured on: a ``VectorIndex``, or a space of a vector store seen as one."""

    def search(
        self, vectors: Any, k: int, *, allowed_ids: Any | None = ..., knobs: SearchKnobs | None = ...
    ) -> tuple[np.ndarray, np.ndarray]: ...


def recall_at_k(
    index: Searchable,
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    k: int = 10,
    queries: int = 200,
    seed: int = 0,
    knobs: SearchKnobs | None = None,
) -> float:
    """Recall@k of ``index`` against exact search over ``vectors`` (n, d) unit rows stored under
    ``ids`` (n,), with a seeded sample of ``queries`` of them as held-out queries: the mean share of
    each query's exact k nearest other vectors that the index returns among its k best other ids.
    1.0 when there is nothing else to find (fewer than two vectors); ``k`` is at most n - 1."""
    n = len(ids)
    if n < 2:
        return 1.0
    k = min(k, n - 1)
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)
    sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    truth = ids[exact_knn(sample, vectors, k + 1)]
    _, found = index.search(sample, k + 1, knobs=knobs)
    hits = 0
    for own, exact, approximate in zip(ids[rows], truth, found, strict=True):
        others = exact[exact != own][:k]
        answered = approximate[(approximate >= 0) & (approximate != own)][:k]
        hits += len(np.intersect1d(others, answered))
    return float(hits / (len(rows) * k))
