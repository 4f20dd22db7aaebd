"""Reading jobs' rows: one job, the newest jobs, waiting for one to end."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import InvalidRequest, JobNotFound
from app.data.records import CollectionRecord, JobRecord, utcnow


@dataclass(frozen=True)
class JobInfo:
    record: JobRecord
    collection: str | None
    images_per_second: float | None


JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def get_job(ctx: AppContext, job_id: str) -> JobInfo:
    with ctx.db.session() as session:
        row = session.execute(
            select(JobRecord, CollectionRecord.name)
            .outerjoin(CollectionRecord, CollectionRecord.id == JobRecord.collection_id)
            .where(JobRecord.id == job_id)
        ).first()
    if row is None:
        raise JobNotFound(f"there is no job with id {job_id!r}")
    return _job_info(*row)


def list_jobs(
    ctx: AppContext,
    *,
    collection: str | None = None,
    state: str | None = None,
    kinds: list[str] | None = None,
    limit: int = 20,
) -> list[JobInfo]:
    """The newest jobs first, optionally of one collection, in one state, of some kinds."""
    if state is not None and state not in JOB_STATES:
        raise InvalidRequest(f"state must be one of {', '.join(JOB_STATES)}, not {state[:40]!r}")
    with ctx.db.session() as session:
        stmt = select(JobRecord, CollectionRecord.name).outerjoin(
            CollectionRecord, CollectionRecord.id == JobRecord.collection_id
        )
        if collection is not None:
            stmt = stmt.where(JobRecord.collection_id == require_collection(session, collection).id)
        if state is not None:
            stmt = stmt.where(JobRecord.state == state)
        if kinds:
            stmt = stmt.where(JobRecord.kind.in_(kinds))
        rows = session.execute(stmt.order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit)).all()
    return [_job_info(record, name) for record, name in rows]


def _job_info(record: JobRecord, name: str | None) -> JobInfo:
    rate = None
    if record.started_at is not None:
        end = record.finished_at or utcnow()
        started = record.started_at
        if started.tzinfo is None:  # SQLite returns naive UTC
            end = end.replace(tzinfo=None)
        seconds = max((end - started).total_seconds(), 1e-6)
        rate = round(record.done / seconds, 1)
    return JobInfo(record=record, collection=name, images_per_second=rate)


def wait_for_job(ctx: AppContext, job_id: str, *, timeout: float = 600.0) -> JobInfo:
    """Poll until the job ends (CLI and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        info = get_job(ctx, job_id)
        if info.record.state in FINAL_STATES or time.monotonic() > deadline:
            return info
        time.sleep(0.1)
