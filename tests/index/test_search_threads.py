"""A single query searches on one thread, a batch on every core and by BLAS; both exact."""

from __future__ import annotations

import faiss
import numpy as np

from index import VectorIndex
from index.threads import BATCH_QUERIES, BLAS_PER_THREAD, cores, search_threads


def test_one_query_gets_one_thread_a_batch_every_core_and_the_count_is_put_back() -> None:
    before = faiss.omp_get_max_threads()
    with search_threads(1) as threads:
        assert threads == 1 == faiss.omp_get_max_threads()
    assert faiss.omp_get_max_threads() == before
    with search_threads(BATCH_QUERIES) as threads:
        assert threads == cores() == faiss.omp_get_max_threads()
    assert faiss.omp_get_max_threads() == before


def test_the_blas_threshold_follows_the_cores() -> None:
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_PER_THREAD * cores()


def test_a_batch_by_blas_finds_what_each_query_alone_finds() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 84)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(84, factory="Flat")
    index.add(vectors, np.arange(1, 3001))
    queries = vectors[:40]  # 40 x 84 is past the threshold on any core count up to 4
    batch_scores, batch_ids = index.search(queries, 10)
    for row, query in enumerate(queries):
        scores, ids = index.search(query[None, :], 10)
        assert list(ids[0]) == list(batch_ids[row])
        np.testing.assert_allclose(scores[0], batch_scores[row], atol=1e-5)
    assert list(batch_ids[:, 0]) == list(range(1, 41))  # each its own nearest
