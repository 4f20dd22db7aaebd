"""A batch's image files written on the context's file threads while its rows are inserted."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Protocol, TypeVar

from app.core.workers import Workers


class Positioned(Protocol):
    @property
    def index(self) -> int: ...  # the item's position in its batch


Item = TypeVar("Item", bound=Positioned)

FEW = 8  # an upload or a small batch: written here, now


def _put_each(put: Callable[[Item], None], part: Sequence[Item]) -> tuple[int, Exception] | None:
    """Write every file of ``part``; the first failure (by batch position) and its error, or None."""
    first: tuple[int, Exception] | None = None
    for item in part:
        try:
            put(item)
        except Exception as exc:  # the other files are still written; on_disk raises this one
            if first is None or item.index < first[0]:
                first = (item.index, exc)
    return first


def write_files(
    workers: Workers, items: Sequence[Item], *, put: Callable[[Item], None], sync: bool
) -> Callable[..., None]:
    """Start writing the files (on the file threads when there are more than a few); returns
    ``on_disk(raising=True)``, which waits for every write, then (``sync``) flushes them all at
    once and raises the first write's error."""
    if len(items) <= FEW:
        for item in items:
            put(item)
        if sync and items:
            os.sync()
        return lambda raising=True: None
    # One task per file thread, each writing its share in turn: a future per file cost the batch's
    # thread more Python time (under the GIL) than the writes it handed over.
    threads = workers.file_threads
    writes = [
        workers.file_writers.submit(_put_each, put, part)
        for part in (items[i::threads] for i in range(threads))
        if part
    ]

    def on_disk(raising: bool = True) -> None:
        futures.wait(writes)
        if not raising:
            return
        errors = [error for write in writes if (error := write.result()) is not None]
        if errors:
            raise min(errors, key=lambda pair: pair[0])[1]  # the first file's, as written in order
        if sync:
            os.sync()  # one flush for the whole batch instead of one fsync per file

    return on_disk
