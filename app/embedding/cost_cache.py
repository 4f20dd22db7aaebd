"""What the cost estimates (app/embedding/cost.py) remember for the life of one service: the
measured seconds per image of each embedder, and each collection's mean pixel count for a minute.

It belongs to the application context, so two services in one process (tests, the CLI beside a
server) never share figures measured on another's data or device.
"""

from __future__ import annotations

import threading
import time

PIXELS_TTL_S = 60.0  # a collection's mean pixel count is one aggregate over its rows: kept a minute
MAX_PIXELS_KEPT = 1000  # collections remembered at once; the oldest is forgotten first


class CostCache:
    """Thread-safe; keys are (embedder version, device) for speeds and a collection id for pixels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._speeds: dict[tuple[str, str], float] = {}
        self._pixels: dict[int, tuple[float, float]] = {}  # collection id: (mean pixels, when)

    def speed(self, key: tuple[str, str]) -> float | None:
        with self._lock:
            return self._speeds.get(key)

    def set_speed(self, key: tuple[str, str], seconds: float) -> None:
        with self._lock:
            self._speeds[key] = seconds

    def pixels(self, collection_id: int) -> float | None:
        """The mean pixel count kept for the collection, unless older than PIXELS_TTL_S."""
        with self._lock:
            known = self._pixels.get(collection_id)
        if known is None or time.monotonic() - known[1] >= PIXELS_TTL_S:
            return None
        return known[0]

    def set_pixels(self, collection_id: int, value: float) -> None:
        with self._lock:
            self._pixels.pop(collection_id, None)
            self._pixels[collection_id] = (value, time.monotonic())
            while len(self._pixels) > MAX_PIXELS_KEPT:
                del self._pixels[next(iter(self._pixels))]
