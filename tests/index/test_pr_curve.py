"""The precision-recall curve against hand-computed rankings and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from index.metrics import precision_recall_curve


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference(q, ql, db, dbl, levels):  # type: ignore[no-untyped-def]
    """Textbook 11-point interpolation from a stable full sort per query."""
    recall_levels = np.linspace(0, 1, levels)
    curves = []
    for i in range(len(q)):
        order = np.argsort(-(db @ q[i]), kind="stable")
        rel = (dbl[order] == ql[i]).astype(float)
        r = rel.sum()
        if r == 0:
            curves.append(np.zeros(levels))
            continue
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        recall = np.cumsum(rel) / r
        curves.append([precision[recall >= level - 1e-12].max() for level in recall_levels])
    return np.mean(curves, axis=0)


def test_hand_computed_curve() -> None:
    # Query (1, 0); db by score: A(1.0) B(0.8) A(0.6) B(0.0) A(-1.0), relevant = A, R = 3.
    # Relevant at ranks 1, 3, 5: precision 1, 2/3, 3/5 at recall 1/3, 2/3, 1.
    db = unit(np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [-1, 0]]))
    curve = precision_recall_curve(
        query_vectors=unit(np.array([[1, 0]])),
        query_labels=np.array([0]),
        db_vectors=db,
        db_labels=np.array([0, 1, 0, 1, 0]),
        levels=4,  # recall 0, 1/3, 2/3, 1
    )
    assert curve["recall"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert curve["precision"] == pytest.approx([1, 1, 2 / 3, 3 / 5])


def test_interpolation_takes_the_best_precision_at_higher_recall() -> None:
    # Relevant at ranks 2 and 3 (of 3): precision 1/2 then 2/3; interpolated 2/3 at every level.
    db = unit(np.array([[1, 0], [0.8, 0.6], [0.6, 0.8]]))
    curve = precision_recall_curve(
        query_vectors=unit(np.array([[1, 0]])),
        query_labels=np.array([1]),
        db_vectors=db,
        db_labels=np.array([0, 1, 1]),
        levels=3,
    )
    assert curve["precision"] == pytest.approx([2 / 3, 2 / 3, 2 / 3])


def test_query_without_relevant_rows_counts_as_zero() -> None:
    db = unit(np.array([[1, 0], [0, 1]]))
    curve = precision_recall_curve(
        query_vectors=unit(np.array([[1, 0], [1, 0]])),
        query_labels=np.array([0, 9]),  # label 9 is nowhere in the db
        db_vectors=db,
        db_labels=np.array([0, 1]),
        levels=2,
    )
    assert curve["precision"] == pytest.approx([0.5, 0.5])


def test_ties_rank_in_db_order() -> None:
    # Rows 0 (irrelevant) and 1 (relevant) tie: db order puts the relevant one second.
    db = unit(np.array([[1, 0], [1, 0], [0, 1]]))
    curve = precision_recall_curve(
        query_vectors=unit(np.array([[1, 0]])),
        query_labels=np.array([1]),
        db_vectors=db,
        db_labels=np.array([0, 1, 0]),
        levels=2,
    )
    assert curve["precision"] == pytest.approx([0.5, 0.5])


def test_matches_brute_force_on_random_clustered_data() -> None:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(5, 16))
    db_labels = rng.integers(0, 5, size=300)
    query_labels = rng.integers(0, 6, size=40)  # label 5: no relevant rows
    db = unit(centres[db_labels] + rng.normal(scale=0.8, size=(300, 16)))
    queries = unit(centres[query_labels % 5] + rng.normal(scale=0.8, size=(40, 16)))
    db[10] = db[11]  # an exact tie across labels
    curve = precision_recall_curve(
        query_vectors=queries,
        query_labels=query_labels,
        db_vectors=db,
        db_labels=db_labels,
        levels=11,
        batch_size=7,
    )
    expected = reference(queries, query_labels, db, db_labels, 11)
    assert np.asarray(curve["precision"]) == pytest.approx(expected, abs=1e-9)
    assert len(curve["recall"]) == 11
    assert all(a >= b - 1e-12 for a, b in zip(curve["precision"], curve["precision"][1:], strict=False))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="dimension"):
        precision_recall_curve(
            query_vectors=np.ones((1, 2), np.float32),
            query_labels=np.array([0]),
            db_vectors=np.ones((1, 3), np.float32),
            db_labels=np.array([0]),
        )
    with pytest.raises(ValueError, match="levels"):
        precision_recall_curve(
            query_vectors=np.ones((1, 2), np.float32),
            query_labels=np.array([0]),
            db_vectors=np.ones((1, 2), np.float32),
            db_labels=np.array([0]),
            levels=1,
        )
