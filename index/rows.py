"""Which vector rows and ids an index can hold: the one definition the index, the service's writers
and its start-up replay share, so that a row the index would refuse is never stored in the first place.

Vectors are ``(n, d)`` float32 rows of unit L2 norm; ids are non-negative int64 (the database's
image ids); ``-1`` is FAISS's "no result" sentinel and never a valid id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["UNIT_NORM_TOL", "ZERO_NORM", "as_ids", "as_vectors", "row_faults", "unusable_rows"]

# Embedders L2-normalise their rows, so a healthy row's norm is 1 up to float32 rounding; the index
# refuses any other (``VectorIndex.add``) with this tolerance.
UNIT_NORM_TOL = 1e-3
# Below this a row is zero: a constant image (all black) gives no direction to normalise.
ZERO_NORM = 1e-6
_INT64_MAX = np.iinfo(np.int64).max


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


def as_vectors(vectors: Any, dim: int) -> np.ndarray:
    """``vectors`` as a C-contiguous (n, dim) float32 array; ``ValueError`` saying which rows are
    off when it is not 2-D of that dimension, not floating point, not finite or not unit norm."""
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, {dim}); got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise ValueError(f"vectors have dimension {arr.shape[1]}; this index has {dim}")
    if arr.dtype.kind != "f":
        raise ValueError(f"vectors must be floating point; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise ValueError(f"vectors contain NaN or inf (rows {bad[:10].tolist()})")
    if arr.shape[0]:
        norms = np.linalg.norm(arr, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOL)
        if bad.size:
            raise ValueError(
                f"vectors must be L2-normalised; rows {bad[:10].tolist()} have norms "
                f"{norms[bad[:10]].round(4).tolist()}"
            )
    return arr


def as_ids(ids: Any) -> np.ndarray:
    """``ids`` (a scalar or 1-D integers) as a C-contiguous (n,) int64 array; ``ValueError`` when
    they are not integers, do not fit int64 or are negative."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers; got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:
        raise ValueError("ids must fit in int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if int(arr.min()) < 0:
        raise ValueError("ids must be non-negative (-1 is FAISS's 'no result' marker)")
    return arr
