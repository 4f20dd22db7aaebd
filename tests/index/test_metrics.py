"""Retrieval metrics on hand-computed rankings and against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from index.metrics import evaluate_retrieval


def unit(*rows: list[float]) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def reference(q, ql, db, dbl, k, exclude_self=False):
    """Brute force: a stable full sort per query, then the textbook formulas."""
    p, apk, ap = [], [], []
    for i in range(len(q)):
        scores = db @ q[i]
        order = np.argsort(-scores, kind="stable")
        if exclude_self:
            order = order[order != i]
        rel = (dbl[order] == ql[i]).astype(float)
        r = rel.sum()
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        p.append(rel[:k].sum() / k)
        apk.append((prec[:k] * rel[:k]).sum() / min(k, r) if r else 0.0)
        ap.append((prec * rel).sum() / r if r else 0.0)
    return np.mean(p), np.mean(apk), np.mean(ap)


def test_hand_computed_ranking() -> None:
    # Query (1, 0); db by score: A(1.0) B(0.8) A(0.6) B(0.0) A(-1.0), relevant = A, R = 3.
    db = unit([1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [-1, 0])
    result = evaluate_retrieval(
        query_vectors=unit([1, 0]),
        query_labels=np.array([0]),
        db_vectors=db,
        db_labels=np.array([0, 1, 0, 1, 0]),
        k=2,
    )
    assert result["queries"] == 1
    assert result["p_at_10"] == pytest.approx(1 / 2)  # P@2
    assert result["map_at_10"] == pytest.approx((1 / 1) / 2)  # P@1 * 1 / min(2, 3)
    assert result["map_all"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)


def test_ties_rank_in_db_order() -> None:
    # Rows 1 (irrelevant) and 2 (relevant) tie at 1.0: db order puts the irrelevant one first.
    result = evaluate_retrieval(
        query_vectors=unit([1, 0]),
        query_labels=np.array([7]),
        db_vectors=unit([0, 1], [1, 0], [1, 0]),
        db_labels=np.array([7, 3, 7]),
        k=1,
    )
    assert result["p_at_10"] == 0.0
    assert result["map_all"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_exclude_self_and_unknown_labels() -> None:
    vectors = unit([1, 0], [1, 0.1], [0, 1])
    result = evaluate_retrieval(
        query_vectors=vectors,
        query_labels=np.array([0, 0, 1]),
        db_vectors=vectors,
        db_labels=np.array([0, 0, 1]),
        k=1,
        exclude_self=True,
    )
    # Queries 0 and 1 find each other first; query 2 has no other row of its class.
    assert result["p_at_10"] == pytest.approx(2 / 3)
    assert result["map_all"] == pytest.approx(2 / 3)
    absent = evaluate_retrieval(
        query_vectors=vectors[:1],
        query_labels=np.array([9]),
        db_vectors=vectors,
        db_labels=np.array([0, 0, 1]),
        k=1,
    )
    assert absent["p_at_10"] == absent["map_all"] == 0.0


@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_brute_force_with_many_ties(exclude_self: bool) -> None:
    rng = np.random.default_rng(0)
    # Small integer vectors: many exact score ties between relevant and irrelevant rows, and
    # exact dot products, so any BLAS gives the reference the same ties.
    db = rng.integers(-2, 3, size=(300, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    queries, qlabels = (db, labels) if exclude_self else (db[:57], rng.integers(0, 5, 57))
    result = evaluate_retrieval(
        query_vectors=queries,
        query_labels=qlabels,
        db_vectors=db,
        db_labels=labels,
        k=10,
        batch_size=16,
        exclude_self=exclude_self,
    )
    p, apk, ap = reference(queries, qlabels, db, labels, 10, exclude_self)
    assert result["p_at_10"] == pytest.approx(p)
    assert result["map_at_10"] == pytest.approx(apk)
    assert result["map_all"] == pytest.approx(ap)


def test_rejects_mismatched_inputs() -> None:
    v = unit([1, 0], [0, 1])
    with pytest.raises(ValueError, match="dimension"):
        evaluate_retrieval(
            query_vectors=unit([1, 0, 0]), query_labels=np.array([0]),
            db_vectors=v, db_labels=np.array([0, 1]),
        )  # fmt: skip
    with pytest.raises(ValueError, match="k must be"):
        evaluate_retrieval(
            query_vectors=v, query_labels=np.array([0, 1]), db_vectors=v,
            db_labels=np.array([0, 1]), k=10,
        )  # fmt: skip
