"""A batch's files: every one written even when some fail, the first failure (by position) raised."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from app.core.workers import Workers
from app.ingest.file_writes import FEW, write_files


@dataclass(frozen=True)
class Item:
    index: int


@pytest.fixture
def workers() -> Iterator[Workers]:
    pool = Workers(file_threads=3)
    yield pool
    pool.close()


def test_every_file_is_written_and_the_first_failure_by_position_is_raised(workers: Workers) -> None:
    written: list[int] = []
    lock = threading.Lock()

    def put(item: Item) -> None:
        if item.index in (7, 4):
            raise OSError(f"disk full at {item.index}")
        with lock:
            written.append(item.index)

    items = [Item(i) for i in range(20)]
    on_disk = write_files(workers, items, put=put, sync=False)
    with pytest.raises(OSError, match="at 4"):
        on_disk()
    assert sorted(written) == [i for i in range(20) if i not in (4, 7)]
    on_disk(raising=False)  # waits, raises nothing


def test_a_few_files_are_written_at_once_here(workers: Workers) -> None:
    here = threading.get_ident()
    seen: list[int] = []
    on_disk = write_files(
        workers, [Item(i) for i in range(FEW)], put=lambda _: seen.append(threading.get_ident()), sync=False
    )
    assert seen == [here] * FEW
    on_disk()
