"""The default threshold of a near-duplicate run: one place, set from the benchmark's measurement.

A cosine similarity between L2-normalised served codes; a pair at or above it is a near duplicate.
"""

from __future__ import annotations

# Provisional: to be replaced by the value measured on altered copies (benchmarks/duplicates_1m.py
# and the threshold study), per embedder where they differ.
DEFAULT_THRESHOLD = 0.9
BY_EMBEDDER: dict[str, float] = {}


def default_threshold(embedder: str | None = None) -> float:
    """The threshold a run uses when none is given, for a collection served by ``embedder`` (a spec
    string; its name before any ``:options`` decides)."""
    name = (embedder or "").split(":", 1)[0]
    return BY_EMBEDDER.get(name, DEFAULT_THRESHOLD)
