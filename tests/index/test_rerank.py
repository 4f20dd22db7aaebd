"""PCA-whitening and alpha query expansion: the numpy core of Babenko-style compressed codes."""

from __future__ import annotations

import numpy as np
import pytest

from index.rerank import expand_queries, fit_whitening, l2_rows


def clustered(n: int = 400, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.1, d)  # anisotropic: whitening has something to undo
    return l2_rows(rng.normal(size=(n, d)) * scales + 0.5)


def test_whitening_decorrelates_and_keeps_unit_rows() -> None:
    vectors = clustered()
    whitening = fit_whitening(vectors, dim=16, shrinkage=0.0)
    projected = (vectors - whitening.mean) @ whitening.projection
    covariance = np.cov(projected, rowvar=False)
    np.testing.assert_allclose(covariance, np.eye(16), atol=1e-3)
    out = whitening.apply(vectors)
    assert out.shape == (400, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_whitening_shrinkage_tempers_the_smallest_components() -> None:
    vectors = clustered()
    plain = fit_whitening(vectors, dim=16, shrinkage=0.0)
    shrunk = fit_whitening(vectors, dim=16, shrinkage=1.0)
    # with full shrinkage every component is scaled alike: a rotation (PCA) times one constant
    norms = np.linalg.norm(shrunk.projection, axis=0)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-4)
    assert np.linalg.norm(plain.projection[:, -1]) > np.linalg.norm(plain.projection[:, 0])


@pytest.mark.parametrize("dim", [0, 33, 401])
def test_whitening_refuses_more_dims_than_data(dim: int) -> None:
    with pytest.raises(ValueError, match="whitening to"):
        fit_whitening(clustered(), dim=dim)


def test_query_expansion_averages_with_weighted_neighbours() -> None:
    query = l2_rows(np.array([[1.0, 0.0, 0.0]], dtype=np.float32))
    neighbours = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=np.float32)
    plain = expand_queries(queries=query, neighbours=neighbours, scores=np.array([[0.9, 0.1]]), alpha=0.0)
    np.testing.assert_allclose(plain, l2_rows(np.array([[1.0, 1.0, 1.0]], dtype=np.float32)), atol=1e-6)
    weighted = expand_queries(queries=query, neighbours=neighbours, scores=np.array([[0.9, 0.1]]), alpha=3.0)
    expected = l2_rows(np.array([[1.0, 0.9**3, 0.1**3]], dtype=np.float32))
    np.testing.assert_allclose(weighted, expected, atol=1e-6)
    # a neighbour with a negative similarity adds nothing
    negative = expand_queries(queries=query, neighbours=neighbours, scores=np.array([[0.9, -0.5]]), alpha=1.0)
    np.testing.assert_allclose(negative, l2_rows(np.array([[1.0, 0.9, 0.0]], dtype=np.float32)), atol=1e-6)
