"""Exact search by brute force: the ground truth of every approximate kind, and the answer over a
small filtered set (the service reads the set's stored vectors and searches them here, since a graph
or IVF search restricted to a few ids misses most of them)."""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["exact_knn", "exact_search"]


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Positions in ``vectors`` (m, d) of the exact ``k`` best inner products for each of
    ``queries`` (n, d), both float32: (n, k) int64."""
    _, found = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return np.asarray(found, dtype=np.int64)


def exact_search(
    queries: np.ndarray, k: int, *, vectors: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` best of ``vectors`` ((m, d) float32 unit rows) stored under ``ids`` ((m,)
    int64) for each of ``queries`` ((n, d) float, unit rows), as ``VectorIndex.search`` answers:
    ((n, j) float32 inner products best first, (n, j) int64 ids), j = min(k, m); ties keep the
    order of ``ids``."""
    n = len(queries)
    if len(ids) == 0:
        return np.empty((n, 0), np.float32), np.empty((n, 0), np.int64)
    all_scores, all_ids = [], []
    for query in queries:
        scores = vectors @ query.astype(np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        all_scores.append(scores[order].astype(np.float32))
        all_ids.append(ids[order])
    if not all_ids:
        j = min(k, len(ids))
        return np.empty((0, j), np.float32), np.empty((0, j), np.int64)
    return np.stack(all_scores), np.stack(all_ids)
