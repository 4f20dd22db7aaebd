"""INRIA's Holidays AP and ground-truth scoring."""

from __future__ import annotations

import numpy as np
import pytest

from index.metrics import evaluate_groundtruth, inria_average_precision


def test_inria_ap_matches_eval_holidays_by_hand() -> None:
    # relevant at ranks 1 and 10 of 2: (1+1)/2 + (1/9 + 2/10)/2, each over R=2
    assert inria_average_precision(np.array([1, 10]), relevant=2) == pytest.approx(
        ((1 + 1) / 2 + (1 / 9 + 2 / 10) / 2) / 2
    )
    assert inria_average_precision(np.array([1, 2, 3]), relevant=3) == pytest.approx(1.0)
    # relevant first at rank 2: trapezoid from precision 0/1 to 1/2
    assert inria_average_precision(np.array([2]), relevant=1) == pytest.approx(0.25)
    # a relevant item never retrieved adds nothing but still counts in R
    assert inria_average_precision(np.array([1]), relevant=2) == pytest.approx(0.5)
    assert inria_average_precision(np.array([], dtype=np.int64), relevant=3) == 0.0


def test_evaluate_groundtruth_excludes_rows_at_minus_infinity() -> None:
    scores = np.array(
        [
            [-np.inf, 0.9, 0.8, 0.1],  # query 0: row 1 relevant, ranked first
            [0.2, -np.inf, 0.1, 0.9],  # query 1: row 0 relevant, ranked second
        ]
    )
    result = evaluate_groundtruth(scores=scores, relevant=[np.array([1]), np.array([0])], k=10)
    assert result["queries"] == 2
    assert result["map_all"] == pytest.approx((1.0 + 0.25) / 2)
    assert result["p_at_10"] == pytest.approx(0.1)  # one relevant each in a top 10 of 3 rows
    assert result["map_at_10"] == pytest.approx((1.0 + 0.5) / 2)


def test_evaluate_groundtruth_counts_unmatched_names_as_misses() -> None:
    scores = np.array([[-np.inf, 0.9, 0.5]])
    full = evaluate_groundtruth(scores=scores, relevant=[np.array([1])])
    missing = evaluate_groundtruth(scores=scores, relevant=[np.array([1, -1])])
    assert full["map_all"] == pytest.approx(1.0)
    assert missing["map_all"] == pytest.approx(0.5)
