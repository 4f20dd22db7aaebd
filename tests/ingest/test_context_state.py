"""The write lock, the threads and the worker processes belong to one application context."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from app.catalog.collections import create_collection
from app.context import open_context
from app.core.errors import WeightsMissing
from app.core.settings import Settings
from app.data.records import ImageRecord
from app.ingest.store import Item, ingest_batch


def test_two_contexts_in_one_process_share_no_lock_and_no_workers(
    settings: Settings, make_png: Callable[..., bytes]
) -> None:
    first = open_context(settings)
    second = open_context(settings)
    try:
        assert first.write_lock is not second.write_lock
        assert first.workers is not second.workers
        create_collection(first, name="c", embedder="tiny")
        results = ingest_batch(first, collection="c", items=[Item(f"{i}.png", make_png(i)) for i in range(3)])
        assert [r.status for r in results] == ["added"] * 3
        assert first.workers.decoders is not second.workers.decoders
    finally:
        first.close()
        second.close()


def test_a_closed_context_has_no_workers_left(settings: Settings) -> None:
    ctx = open_context(settings)
    decoders = ctx.workers.decoders
    ctx.close()
    assert decoders._shutdown  # noqa: SLF001 - closed with its context
    with pytest.raises(RuntimeError):
        ctx.workers.decoders.submit(print)


def test_an_embedder_that_fails_to_load_stores_nothing_of_the_batch(
    settings: Settings, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load error is the answer for every image of the batch: none is stored without a vector."""
    ctx = open_context(settings)
    try:
        create_collection(ctx, name="c", embedder="tiny")
        calls = []

        def missing(*args: object, **kwargs: object) -> None:
            calls.append(1)
            raise WeightsMissing("put the weights file in place")

        monkeypatch.setattr(ctx.embedders, "for_collection", missing)
        try:
            results = ingest_batch(
                ctx, collection="c", items=[Item(f"{i}.png", make_png(i)) for i in range(3)]
            )
        except WeightsMissing:
            results = []
        assert all(r.status == "rejected" and r.code == "weights_missing" for r in results)
        assert len(calls) >= 1
        with ctx.db.session() as session:
            assert session.scalar(select(func.count()).select_from(ImageRecord)) == 0
    finally:
        ctx.close()
