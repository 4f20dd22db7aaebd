"""Jobs claimed, not owned (app/ingest/leases.py): two processes' runners (two contexts on one
database and one data folder) claim, fence, hand over and cancel each other's jobs through the
jobs table alone. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update

from app.catalog.collections import create_collection, get_collection, require_collection
from app.context import AppContext, open_context
from app.core.settings import Settings
from app.data.records import ImageRecord, JobRecord, utcnow
from app.ingest import jobs
from app.ingest import pipeline as pipeline_module
from app.ingest.sources.archive import check_archive
from app.ingest.sources.base import Source
from tests.api.test_imports import make_zip

BATCH = 8
MEMBERS = 40


@pytest.fixture
def settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(pipeline_module, "CHUNK_ITEMS", 4)
    return settings.model_copy(
        update={"import_batch_size": BATCH, "job_lease_seconds": 2.0, "job_poll_seconds": 0.1}
    )


@pytest.fixture
def two(settings: Settings) -> Iterator[tuple[AppContext, AppContext]]:
    """Two processes' worth of state (journals, runners' identities) on one database."""
    first = open_context(settings)
    second = open_context(settings)
    try:
        yield first, second
    finally:
        second.close()
        first.close()


Replicas = tuple[AppContext, jobs.JobRunner, AppContext, jobs.JobRunner]


@pytest.fixture
def replicas(two: tuple[AppContext, AppContext]) -> Iterator[Replicas]:
    """An API replica's state and its runner (it runs no jobs: it queues them), and a worker's,
    with the collection "c"."""
    api, worker = two
    create_collection(api, name="c", embedder="tiny")
    queueing = jobs.JobRunner(api, runs_jobs=False)
    running = jobs.JobRunner(worker)
    try:
        yield api, queueing, worker, running
    finally:
        running.shutdown()
        queueing.shutdown()


@pytest.fixture
def members(make_png: Callable[..., bytes]) -> dict[str, bytes]:
    return {f"img/{i:03d}.png": make_png(i, size=(12, 12)) for i in range(MEMBERS)}


def queued_import(ctx: AppContext, runner: jobs.JobRunner, tmp_path: Path, members: dict[str, bytes]) -> str:
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.zip"
    path.write_bytes(make_zip(members))
    source = check_archive(jobs.keep_upload(ctx, path, suffix=".archive"), "photos.zip")
    return runner.create_job(collection="c", source=source)


def row(ctx: AppContext, job_id: str) -> JobRecord:
    with ctx.db.session() as session:
        record = session.get(JobRecord, job_id)
        assert record is not None
        return record


def expire(ctx: AppContext, job_id: str) -> None:
    """As if the holder had stopped renewing long ago (it froze, or its machine went away)."""
    with ctx.db.transaction() as session:
        session.execute(
            update(JobRecord).where(JobRecord.id == job_id).values(lease_until=utcnow() - timedelta(hours=1))
        )


def wait_until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_held_job_cannot_be_claimed_until_its_lease_runs_out(
    two: tuple[AppContext, AppContext], tmp_path: Path, members: dict[str, bytes]
) -> None:
    a, b = two
    create_collection(a, name="c", embedder="tiny")
    runner_a, runner_b = jobs.JobRunner(a), jobs.JobRunner(b)
    try:
        job_id = queued_import(a, runner_a, tmp_path, members)
        record = row(a, job_id)
        assert record.owner == runner_a.leases.owner and record.lease_until is not None
        assert runner_b.leases.claim(job_id) is None
        assert runner_b.leases.claim_next(["import"]) is None
        expire(a, job_id)
        claimed = runner_b.leases.claim_next(["import"])
        assert claimed is not None and claimed.job_id == job_id
        assert claimed.previous == runner_a.leases.owner and claimed.taken_over
        # Fenced: the old holder can no longer move or end it.
        runner_a._finish(job_id, state="succeeded")
        assert row(a, job_id).state == "queued"
        assert runner_a.leases.claim(job_id) is None  # b holds a live lease now
    finally:
        runner_a.shutdown()
        runner_b.shutdown()


def test_the_holder_renews_its_lease_and_notices_a_takeover(
    two: tuple[AppContext, AppContext], tmp_path: Path, members: dict[str, bytes]
) -> None:
    a, b = two
    create_collection(a, name="c", embedder="tiny")
    runner_a = jobs.JobRunner(a)
    try:
        job_id = queued_import(a, runner_a, tmp_path, members)
        first = row(a, job_id).lease_until
        wait_until(lambda: row(a, job_id).lease_until != first, seconds=10)  # renewed (every lease/3)
        with a.db.transaction() as session:  # another worker took it over
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(owner="other.journal"))
        wait_until(lambda: runner_a.holdings.lost(job_id), seconds=10)
        assert job_id not in runner_a.holdings.held()
    finally:
        runner_a.shutdown()


def test_an_api_replica_queues_and_a_worker_polls_claims_and_runs(
    replicas: Replicas, tmp_path: Path, members: dict[str, bytes]
) -> None:
    api, queueing, worker, running = replicas
    job_id = queued_import(api, queueing, tmp_path, members)
    assert (row(api, job_id).state, row(api, job_id).owner) == ("queued", None)
    running.start_polling()
    record = jobs.wait_for_job(api, job_id, timeout=60).record
    assert (record.state, record.added, record.owner) == ("succeeded", MEMBERS, running.leases.owner)
    assert record.lease_until is None  # ended with the job


def test_a_cancel_asked_of_one_replica_stops_the_job_another_runs(
    replicas: Replicas, tmp_path: Path, members: dict[str, bytes]
) -> None:
    api, queueing, worker, running = replicas
    job_id = queued_import(api, queueing, tmp_path, members)
    seen = []

    def cancel_after_first_batch(counts: dict[str, int], total: int | None) -> None:
        if not seen:
            seen.append(counts["done"])
            queueing.cancel(job_id)  # through the row: the worker's keeper sees it

    claimed = running.holdings.claim_next(["import"])
    assert claimed is not None
    source = jobs.from_params(claimed.params, data_dir=worker.settings.data_dir)
    running.run_import(job_id=job_id, collection="c", source=source, on_progress=cancel_after_first_batch)
    record = row(api, job_id)
    assert record.state == "cancelled" and record.cancel_requested
    assert BATCH <= record.done < MEMBERS


def stopped_after_one_batch(ctx: AppContext, tmp_path: Path, members: dict[str, bytes]) -> tuple[str, Source]:
    """An import whose runner shut down after its first committed batch (left running)."""
    create_collection(ctx, name="c", embedder="tiny")
    runner = jobs.JobRunner(ctx)
    job_id = queued_import(ctx, runner, tmp_path, members)
    source = jobs.from_params(row(ctx, job_id).params, data_dir=ctx.settings.data_dir)
    runner.run_import(
        job_id=job_id, collection="c", source=source, on_progress=lambda counts, total: runner.shutdown()
    )
    return job_id, source


def test_a_clean_shutdown_gives_its_leases_up_and_another_worker_resumes_at_once(
    two: tuple[AppContext, AppContext], tmp_path: Path, members: dict[str, bytes]
) -> None:
    a, b = two
    job_id, source = stopped_after_one_batch(a, tmp_path, members)
    record = row(a, job_id)
    assert record.state == "running" and record.cursor == BATCH
    runner_b = jobs.JobRunner(b)
    try:
        claimed = runner_b.holdings.claim_next(["import"])  # no wait for the lease: it was given up
        assert claimed is not None and claimed.taken_over
        runner_b.run_import(job_id=job_id, collection="c", source=source)
        record = row(b, job_id)
        assert (record.state, record.added, record.done) == ("succeeded", MEMBERS, MEMBERS)
        with b.db.session() as session:
            assert session.scalar(select(func.count()).select_from(ImageRecord)) == MEMBERS
        info = get_collection(b, "c")
        assert info.index_size == MEMBERS
    finally:
        runner_b.shutdown()


def test_a_takeover_puts_back_the_vectors_its_dead_holder_committed_but_never_indexed(
    two: tuple[AppContext, AppContext], tmp_path: Path, members: dict[str, bytes]
) -> None:
    """The holder died between its commit and the index add: the taker re-adds those vectors."""
    a, b = two
    job_id, source = stopped_after_one_batch(a, tmp_path, members)
    with b.db.session() as session:
        record = require_collection(session, "c")
        ids = np.asarray(session.scalars(select(ImageRecord.id).order_by(ImageRecord.id)).all())
    assert len(ids) == BATCH
    index = b.indexes.get(record)  # b serves the collection (loaded now, with a's first batch)
    assert index is not None and index.ntotal == BATCH
    b.indexes.remove(record, ids[-3:])  # as if a had died before adding these three
    assert index.ntotal == BATCH - 3
    runner_b = jobs.JobRunner(b)
    try:
        assert runner_b.holdings.claim_next(["import"]) is not None
        runner_b.run_import(job_id=job_id, collection="c", source=source)
        assert row(b, job_id).state == "succeeded"
        served = b.indexes.get(record)
        assert served is not None and served.ntotal == MEMBERS
    finally:
        runner_b.shutdown()
