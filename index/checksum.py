"""Order-independent fingerprints of id sets: an index file carries one for its ids, and the service
compares the index's with the database's (``id_checksum(db_ids)``) without moving the ids.

The fingerprint is ``"<count>:<sum><xor>"`` of the splitmix64-mixed ids, both parts incremental, so
an index keeps it current through adds and removes at the cost of mixing the ids it changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MASK64", "format_checksum", "id_checksum", "mix_parts"]

MASK64 = (1 << 64) - 1


def _mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of int64 ids, as uint64 (array ops wrap silently)."""
    z = ids.astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix_parts(ids: np.ndarray) -> tuple[int, int]:
    """(sum mod 2**64, xor) of mixed ids: the incremental parts of the checksum."""
    if ids.size == 0:
        return 0, 0
    mixed = _mix64(ids)
    return int(np.add.reduce(mixed, dtype=np.uint64)), int(np.bitwise_xor.reduce(mixed))


def format_checksum(count: int, total: int, xor: int) -> str:
    return f"{count}:{total & MASK64:016x}{xor:016x}"


def id_checksum(ids: Any) -> str:
    """Order-independent fingerprint of a set of int64 ids, e.g. ``"3:9f...e1"``.

    The same function backs ``VectorIndex.id_checksum()``, so the service can compute it
    from the database's ids and compare. ``ids`` must be unique (it is a set fingerprint).
    """
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    total, xor = mix_parts(arr)
    return format_checksum(arr.size, total, xor)
