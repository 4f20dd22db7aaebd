"""Search restricted to an id set (FAISS IDSelectorBatch), for every index kind."""

from __future__ import annotations

import numpy as np
import pytest

from index import VectorIndex


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d))
    rows = centres[rng.integers(0, 8, size=n)] + rng.normal(scale=0.3, size=(n, d))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def exact_among(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, allowed: np.ndarray, k: int):  # type: ignore[no-untyped-def]
    mask = np.isin(ids, allowed)
    scores = vectors[mask] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[mask][order]


def test_flat_search_returns_the_exact_best_among_allowed_ids() -> None:
    vectors = clustered(500, 16)
    ids = np.arange(500, dtype=np.int64) * 2 + 1
    index = VectorIndex.build(vectors, ids)
    allowed = ids[::7]

    scores, found = index.search(vectors[:3], 10, allowed_ids=allowed)

    assert found.shape == (3, 10)
    assert np.isin(found, allowed).all()
    for row in range(3):
        assert found[row].tolist() == exact_among(vectors, ids, vectors[row], allowed, 10).tolist()
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_fewer_allowed_ids_than_k_gives_fewer_columns() -> None:
    vectors = clustered(50, 8)
    ids = np.arange(50, dtype=np.int64)
    index = VectorIndex.build(vectors, ids)

    scores, found = index.search(vectors[:1], 10, allowed_ids=np.array([3, 9]))

    assert found.shape == (1, 2)
    assert sorted(found[0].tolist()) == [3, 9]
    assert index.search(vectors[:1], 10, allowed_ids=np.array([], dtype=np.int64))[1].shape == (1, 0)


def test_allowed_ids_not_in_the_index_are_ignored() -> None:
    vectors = clustered(50, 8)
    index = VectorIndex.build(vectors, np.arange(50, dtype=np.int64))

    _, found = index.search(vectors[:1], 3, allowed_ids=np.array([1, 2, 1000, 2000]))

    assert set(found[0].tolist()) - {-1} <= {1, 2}


@pytest.mark.parametrize("factory", ["HNSW32", "IVF4,Flat"])
def test_approximate_kinds_accept_a_selector(factory: str) -> None:
    vectors = clustered(800, 16)
    ids = np.arange(800, dtype=np.int64)
    index = VectorIndex.build(vectors, ids, factory=factory)
    allowed = ids[ids % 2 == 0]

    _, found = index.search(vectors[:5], 5, allowed_ids=allowed)

    hits = found[found >= 0]
    assert hits.size > 0
    assert np.isin(hits, allowed).all()
