"""2-D projections of a collection's codes, for the map page (numpy; UMAP when installed)."""

from __future__ import annotations

import importlib.util

import numpy as np

METHODS = ("pca", "umap")


def available_methods() -> list[str]:
    """``pca`` always; ``umap`` only when ``umap-learn`` is importable (never a dependency)."""
    return ["pca"] + (["umap"] if importlib.util.find_spec("umap") is not None else [])


def sample_positions(n: int, size: int) -> np.ndarray:
    """``min(n, size)`` evenly spaced positions in ``range(n)`` (int64, ascending): a
    deterministic sample that spans the whole collection, old images and new."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, size).round().astype(np.int64)


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Project (n, d) float32 rows onto their first two principal components.

    Returns ((n, 2) float32 coordinates, [share of variance of each component]). The sign of
    each component is fixed (largest loading positive) so the picture is stable across runs.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise ValueError("vectors must be a 2-d (n, d) array")
    if len(vectors) == 0:
        return np.zeros((0, 2), dtype=np.float32), [0.0, 0.0]
    centred = vectors - vectors.mean(axis=0)
    # Eigenvectors of the (d, d) covariance: much cheaper than an SVD of the (n, d) rows.
    covariance = centred.T @ centred
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1][:2]
    components = eigenvectors[:, order].T  # (<=2, d)
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1, signs)[:, None]
    coords = centred @ components.T
    if coords.shape[1] < 2:  # one dimension: a line
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    variance = np.clip(eigenvalues, 0, None)
    top = variance[order]
    share = (top / variance.sum()).tolist() if variance.sum() > 0 else [0.0] * len(top)
    return coords.astype(np.float32), [float(x) for x in share] + [0.0] * (2 - len(share))


def umap_2d(vectors: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """UMAP to 2-D (cosine metric); ``ImportError`` when umap-learn is not installed."""
    import umap  # optional: only where installed

    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
    return np.asarray(reducer.fit_transform(np.asarray(vectors, dtype=np.float32)), dtype=np.float32)
