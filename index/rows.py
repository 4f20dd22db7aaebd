"""Which vector rows an index can hold: the one definition the index, the service's writers and its
start-up replay share, so that a row the index would refuse is never stored in the first place."""

from __future__ import annotations

import numpy as np

from index.vector_index import _UNIT_NORM_TOL

__all__ = ["UNIT_NORM_TOL", "ZERO_NORM", "row_faults", "unusable_rows"]

# Embedders L2-normalise their rows, so a healthy row's norm is 1 up to float32 rounding; the index
# refuses any other (``VectorIndex.add``) with this tolerance.
UNIT_NORM_TOL = _UNIT_NORM_TOL
# Below this a row is zero: a constant image (all black) gives no direction to normalise.
ZERO_NORM = 1e-6


def unusable_rows(vectors: np.ndarray) -> np.ndarray:
    """(n,) bool for an (n, d) float array: True where a row holds a NaN or an infinity, or its L2
    norm is not within ``UNIT_NORM_TOL`` of 1 (a zero row among them)."""
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, d); got shape {arr.shape}")
    finite = np.isfinite(arr)
    norms = np.linalg.norm(np.where(finite, arr, 0.0), axis=1)
    return np.asarray(~finite.all(axis=1) | (np.abs(norms - 1.0) > UNIT_NORM_TOL))


def row_faults(vectors: np.ndarray) -> list[str | None]:
    """Per row of an (n, d) float array: None when an index can hold it, else why not:
    ``non_finite``, ``zero`` or ``not_unit_norm``."""
    arr = np.asarray(vectors, dtype=np.float64)
    bad = unusable_rows(arr)
    faults: list[str | None] = [None] * len(arr)
    for row in np.flatnonzero(bad):
        if not np.isfinite(arr[row]).all():
            faults[row] = "non_finite"
        elif np.linalg.norm(arr[row]) < ZERO_NORM:
            faults[row] = "zero"
        else:
            faults[row] = "not_unit_norm"
    return faults
