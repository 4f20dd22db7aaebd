"""Degenerate codes: the one check every writer of vectors and every query makes on embedder output."""

from __future__ import annotations

import logging

import numpy as np

from app.core.errors import DegenerateImage
from index.rows import row_faults

log = logging.getLogger(__name__)

_WHY = {
    "zero": "a zero vector (a constant image, such as an all-black one, has no features to compare)",
    "non_finite": "a vector with NaN or infinity",
    "not_unit_norm": "a vector that is not L2-normalised",
}


def degenerate_codes(
    vectors: np.ndarray, *, embedder: str, query: bool = False
) -> dict[int, DegenerateImage]:
    """Row -> the 422 its image gets, for the rows of (n, d) embedder output that no index can hold
    or search with (index.rows: a zero row, a NaN or an infinity, a norm other than 1); empty when
    every row is a usable code. ``query``: the detail speaks of a search, not of storing."""
    errors: dict[int, DegenerateImage] = {}
    for row, fault in enumerate(row_faults(vectors)):
        if fault is not None:
            outcome = "it cannot be searched with" if query else "nothing was stored"
            errors[row] = DegenerateImage(
                f"the {embedder} embedder gives this image {_WHY[fault]}; {outcome}"
            )
    if errors:
        log.info("%s embedder gave %d degenerate code(s)", embedder, len(errors))
    return errors
