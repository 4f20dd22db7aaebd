"""Every index kind against exact search on seeded clustered data: recall@10 floors, knobs,
deletes (tombstones where FAISS cannot remove), filters, and the automatic choice by size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import SearchKnobs, VectorIndex
from index.exact import exact_knn
from index.kinds import (
    auto_factory,
    build_index,
    default_knobs,
    ivf_pq_factory,
    min_vectors,
    servable_factory,
    validate_factory,
)
from index.recall import recall_at_k

N, DIM = 4000, 32


def clustered(n: int, d: int = DIM, *, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Unit rows around ``clusters`` centres: codes of real images cluster; uniform noise would
    defeat every approximate kind (FACTS.md)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    rows = centres[rng.integers(0, clusters, size=n)] + rng.normal(scale=0.35, size=(n, d))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(N), np.arange(N, dtype=np.int64) * 7 + 3


# (factory, recall@10 floor), recall with held-out queries (index/recall.py): the floors sit a little
# below what these seeds give (Flat, HNSW32, IVF64,Flat and the re-ranked kind 1.0; IVF64,PQ8 0.51,
# OPQ8,IVF64,PQ8 0.51), so a regression in building, training or search parameters shows.
KINDS = [
    ("Flat", 1.0),
    ("HNSW32", 0.95),
    ("IVF64,PQ8", 0.45),
    ("OPQ8,IVF64,PQ8", 0.45),
    ("IVF64,PQ8,RFlat", 0.95),
    ("IVF64,Flat", 0.95),
]


@pytest.mark.parametrize(("factory", "floor"), KINDS)
def test_every_kind_meets_its_recall_floor_against_exact_search(
    data: tuple[np.ndarray, np.ndarray], factory: str, floor: float
) -> None:
    vectors, ids = data
    index = build_index(vectors, ids, factory=factory)

    recall = recall_at_k(index, vectors, ids, k=10, queries=200)

    assert recall >= floor, f"{factory}: recall@10 {recall:.3f} < {floor}"
    assert index.ntotal == N


class _FindsOnlyItself:
    """An index that answers every stored vector with its own id and nothing else."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.vectors, self.ids = vectors, ids

    def search(self, queries: np.ndarray, k: int, **_: object) -> tuple[np.ndarray, np.ndarray]:
        found = np.full((len(queries), k), -1, dtype=np.int64)
        found[:, 0] = self.ids[exact_knn(queries, self.vectors, 1)[:, 0]]
        return np.zeros(found.shape, np.float32), found


def test_recall_holds_each_query_out_so_finding_itself_scores_nothing(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    vectors, ids = data

    assert recall_at_k(_FindsOnlyItself(vectors, ids), vectors, ids, k=10) == 0.0  # type: ignore[arg-type]
    assert recall_at_k(build_index(vectors, ids, factory="Flat"), vectors, ids, k=10) == 1.0


def test_recall_of_a_collection_of_one_or_two() -> None:
    vectors = clustered(2)
    one = build_index(vectors[:1], np.array([5]), factory="Flat")
    two = build_index(vectors, np.array([5, 9]), factory="Flat")

    assert recall_at_k(one, vectors[:1], np.array([5])) == 1.0  # nothing else to find
    assert recall_at_k(two, vectors, np.array([5, 9])) == 1.0  # k becomes 1: the other one


@pytest.mark.parametrize("factory", [f for f, _ in KINDS])
def test_filtered_search_returns_only_allowed_ids_for_every_kind(
    data: tuple[np.ndarray, np.ndarray], factory: str
) -> None:
    vectors, ids = data
    index = build_index(vectors, ids, factory=factory)
    allowed = ids[(ids // 7) % 3 == 0]

    _, found = index.search(vectors[:20], 10, allowed_ids=allowed)

    assert np.isin(found[found >= 0], allowed).all()
    assert (found >= 0).mean() > 0.9


def test_exact_kind_returns_all_of_the_exact_top_k_among_allowed(data: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, ids = data
    index = build_index(vectors, ids, factory="Flat")
    mask = (ids // 7) % 5 == 1
    allowed = ids[mask]

    _, found = index.search(vectors[:10], 10, allowed_ids=allowed)

    truth = allowed[exact_knn(vectors[:10], vectors[mask], 10)]
    for row in range(10):
        assert set(found[row].tolist()) == set(truth[row].tolist())


@pytest.mark.parametrize("factory", [f for f, _ in KINDS])
def test_deleted_ids_are_unfindable_at_once_for_every_kind(
    data: tuple[np.ndarray, np.ndarray], factory: str, tmp_path: Path
) -> None:
    vectors, ids = data
    index = build_index(vectors, ids, factory=factory)
    gone = ids[:50]

    assert index.remove(gone) == 50

    _, found = index.search(vectors[:50], 10)
    assert not np.isin(found, gone).any()
    assert index.ntotal == N - 50
    index.save(tmp_path / "i.cbidx")
    _, after = VectorIndex.load(tmp_path / "i.cbidx").search(vectors[:50], 10)
    assert not np.isin(after, gone).any()


def test_knobs_per_search_trade_speed_for_recall(data: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, ids = data
    index = build_index(vectors, ids, factory="IVF64,PQ8,RFlat")

    narrow = recall_at_k(index, vectors, ids, knobs=SearchKnobs(nprobe=1, k_factor=1))
    wide = recall_at_k(index, vectors, ids, knobs=SearchKnobs(nprobe=64, k_factor=20))

    assert wide > narrow  # held out: narrow 0.48, wide 1.0 on these seeds
    assert wide >= 0.99
    assert index.search_knobs() == SearchKnobs(nprobe=16, k_factor=8.0)  # a search does not change it


def test_index_knobs_are_saved_with_the_file(data: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    vectors, ids = data
    index = build_index(vectors[:1000], ids[:1000], factory="HNSW16", knobs=SearchKnobs(ef_search=99))
    index.save(tmp_path / "h.cbidx")
    assert VectorIndex.load(tmp_path / "h.cbidx").search_knobs() == SearchKnobs(ef_search=99)


def test_auto_is_exact_while_small_then_graph_then_ivf_pq() -> None:
    assert auto_factory(0, 128) == auto_factory(100_000, 128) == "Flat"
    assert auto_factory(100_001, 128) == "HNSW32"
    assert auto_factory(10_000_000, 128).startswith("IVF") and auto_factory(10_000_000, 128).endswith(
        ",RFlat"
    )


def test_ivf_pq_factory_sizes_lists_and_codes() -> None:
    assert ivf_pq_factory(1_000_000, 128) == "IVF1024,PQ32"
    assert ivf_pq_factory(10_000, 84) == "IVF128,PQ21"
    assert ivf_pq_factory(1_000_000, 128, refine=True) == "IVF1024,PQ32,RFlat"


def test_trained_kinds_wait_for_enough_vectors() -> None:
    assert min_vectors("IVF1024,PQ32") == 1024 and min_vectors("HNSW32") == 0 and min_vectors("PQ8") == 256
    assert servable_factory("IDMap2,IVF1024,PQ32", 500) == "IDMap2,Flat"
    assert servable_factory("IDMap2,IVF1024,PQ32", 5000) == "IDMap2,IVF1024,PQ32"


@pytest.mark.parametrize("bad", ["", "NoSuchIndex42", "IVF64,PQ7", "Flat; DROP TABLE images", "x" * 200])
def test_validate_factory_rejects_what_faiss_cannot_build(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_factory(bad, dim=32)


def test_validate_factory_normalises() -> None:
    assert validate_factory(" HNSW32 ", dim=32) == "IDMap2,HNSW32"
    assert default_knobs("HNSW32") == SearchKnobs(ef_search=64)
