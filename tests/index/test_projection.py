"""2-D projections for the map page."""

from __future__ import annotations

import numpy as np
import pytest

from index.projection import available_methods, pca_2d, sample_positions


def test_pca_finds_the_direction_of_largest_variance() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    vectors = np.stack([t * 10, t * 0 + rng.normal(scale=0.1, size=200), rng.normal(scale=1, size=200)], 1)

    coords, share = pca_2d(vectors.astype(np.float32))

    assert coords.shape == (200, 2) and coords.dtype == np.float32
    assert abs(np.corrcoef(coords[:, 0], t)[0, 1]) > 0.99
    assert share[0] > 0.9 and share[0] >= share[1]
    again, _ = pca_2d(vectors.astype(np.float32))
    assert np.array_equal(coords, again)  # deterministic, signs fixed


def test_pca_handles_tiny_inputs() -> None:
    assert pca_2d(np.zeros((0, 4), np.float32))[0].shape == (0, 2)
    assert pca_2d(np.ones((1, 4), np.float32))[0].shape == (1, 2)
    assert pca_2d(np.ones((3, 1), np.float32))[0].shape == (3, 2)
    with pytest.raises(ValueError):
        pca_2d(np.ones(4, np.float32))


def test_sample_positions_span_the_whole_range() -> None:
    assert sample_positions(5, 10).tolist() == [0, 1, 2, 3, 4]
    picked = sample_positions(60_000, 5_000)
    assert len(picked) == 5_000 and picked[0] == 0 and picked[-1] == 59_999
    assert (np.diff(picked) > 0).all()


def test_pca_is_always_available() -> None:
    assert available_methods()[0] == "pca"
