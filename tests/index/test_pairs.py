"""Near pairs over a set of vectors (exact and inverted-file) and their connected components."""

from __future__ import annotations

import numpy as np
import pytest

from index.pairs import Pairs, components, similar_pairs


def planted(n: int = 3000, d: int = 32, *, copies: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit rows (40 wide clusters) plus ``copies`` near copies of random rows (cosine
    about 0.9-0.98 to their original); ids are scattered, not positions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, d))
    x = centers[rng.integers(0, 40, n)] + 1.5 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    originals = rng.choice(n, copies, replace=False)
    noise = rng.normal(size=(copies, d))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = x[originals] + rng.uniform(0.2, 0.45, size=(copies, 1)) * noise
    x = np.vstack([x, near / np.linalg.norm(near, axis=1, keepdims=True)]).astype(np.float32)
    ids = rng.permutation(10 * len(x))[: len(x)].astype(np.int64)
    return x, ids


def brute(vectors: np.ndarray, ids: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    scores = vectors @ vectors.T
    a, b = np.nonzero(np.triu(scores >= threshold, 1))
    return {(min(x, y), max(x, y)) for x, y in zip(ids[a].tolist(), ids[b].tolist(), strict=True)}


def as_set(pairs: Pairs) -> set[tuple[int, int]]:
    return set(zip(pairs.left.tolist(), pairs.right.tolist(), strict=True))


def test_exact_pairs_are_every_pair_at_or_above_the_threshold() -> None:
    vectors, ids = planted()
    pairs = similar_pairs(vectors, ids, threshold=0.9)

    assert pairs.method == "exact" and pairs.truncated_rows == 0
    assert as_set(pairs) == brute(vectors, ids, 0.9) and len(pairs) >= 140
    assert (pairs.left < pairs.right).all() and (pairs.score >= 0.9).all()
    assert pairs.left.dtype == np.int64 and pairs.score.dtype == np.float32
    order = np.lexsort((pairs.right, pairs.left))
    assert (order == np.arange(len(pairs))).all()
    row = {int(i): r for r, i in enumerate(ids)}
    left, right = int(pairs.left[0]), int(pairs.right[0])
    assert pairs.score[0] == pytest.approx(float(vectors[row[left]] @ vectors[row[right]]), abs=1e-5)
    assert len(as_set(pairs)) == len(pairs)


def test_inverted_file_pairs_find_almost_all_exact_pairs_and_nothing_else() -> None:
    vectors, ids = planted()
    truth = brute(vectors, ids, 0.9)

    found = similar_pairs(vectors, ids, threshold=0.9, exact_limit=100, nprobe=4)

    assert found.method == "ivf"
    assert as_set(found) <= truth
    assert len(as_set(found) & truth) / len(truth) >= 0.95


def test_rows_with_more_neighbours_than_k_keep_their_best_and_are_counted() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=16)
    tight = base + 0.01 * rng.normal(size=(10, 16))  # ten rows, all pairs above 0.99
    far = rng.normal(size=(5, 16))
    vectors = np.vstack([tight, far])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(15, dtype=np.int64)

    capped = similar_pairs(vectors, ids, threshold=0.99, k=3)

    assert capped.truncated_rows == 10
    assert as_set(capped) < brute(vectors, ids, 0.99)
    labels = components(capped)
    assert set(labels[0][labels[1] == 0].tolist()) == set(range(10))  # still one group


def test_components_are_numbered_largest_first() -> None:
    # a chain 9-7-5-3 (4), a triangle 20-21-22 (3), a pair 1-2 and a pair 30-31 (2 each)
    left = np.array([7, 5, 3, 20, 20, 21, 1, 30], dtype=np.int64)
    right = np.array([9, 7, 5, 21, 22, 22, 2, 31], dtype=np.int64)
    pairs = Pairs(left=left, right=right, score=np.ones(len(left), np.float32))

    nodes, labels = components(pairs)

    group = dict(zip(nodes.tolist(), labels.tolist(), strict=True))
    assert [group[i] for i in (3, 5, 7, 9)] == [0] * 4
    assert [group[i] for i in (20, 21, 22)] == [1] * 3
    assert group[1] == group[2] == 2 and group[30] == group[31] == 3


def test_components_of_a_long_chain_and_of_nothing() -> None:
    order = np.random.default_rng(2).permutation(500).astype(np.int64)
    pairs = Pairs(left=order[:-1], right=order[1:], score=np.ones(499, np.float32))
    nodes, labels = components(pairs)
    assert len(nodes) == 500 and set(labels.tolist()) == {0}

    empty = Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    assert [len(a) for a in components(empty)] == [0, 0]


def test_small_and_invalid_inputs() -> None:
    one = similar_pairs(np.ones((1, 4), np.float32) / 2, np.array([5]), threshold=0.5)
    assert len(one) == 0
    with pytest.raises(ValueError):
        similar_pairs(np.ones((2, 4), np.float32) / 2, np.array([1, 2]), threshold=1.5)
    with pytest.raises(ValueError):
        similar_pairs(np.ones((2, 4), np.float32) / 2, np.array([1]), threshold=0.5)
