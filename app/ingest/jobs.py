"""Background import jobs: state in the database, work in the staged pipeline, resumable.

A job's row holds its source (enough to open it again), its counters and a high-water mark
(``cursor``) that commits with every batch of rows. A job that a crash or restart interrupted is
picked up on the next start and resumes at its cursor, so nothing is read twice and nothing is
added twice; its per-file report is cut back to the cursor and continued.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import CbirError, JobFinished
from app.data.records import CollectionRecord, JobRecord, utcnow
from app.data.storage import FileJournal
from app.ingest.job_status import FINAL_STATES, JOB_STATES, JobInfo, get_job, list_jobs, wait_for_job
from app.ingest.pipeline import Pipeline
from app.ingest.sources.base import Limits, Source
from app.ingest.sources.kinds import count_members, describe, from_params, members_of
from app.ingest.sources.manifests import finished_state
from app.ingest.store import ItemResult

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 1000

__all__ = [
    "FINAL_STATES",
    "JOB_STATES",
    "JobInfo",
    "get_job",
    "list_jobs",
    "wait_for_job",
]


def report_path(ctx: AppContext, job_id: str) -> Path:
    """The job's per-file report: one JSON object per line (item, status, code, detail, image_id)."""
    return ctx.settings.data_dir / "reports" / f"{job_id}.jsonl"


def _report_lines(results: list[ItemResult]) -> bytes:
    return "".join(
        json.dumps(
            {"item": r.name, "status": r.status, "code": r.code, "detail": r.detail, "image_id": r.image_id},
            ensure_ascii=False,
        )
        + "\n"
        for r in results
    ).encode("utf-8")


def _cut_report(path: Path, lines: int) -> None:
    """Keep the first ``lines`` lines: those of committed members (a killed job may have written
    the lines of a batch whose transaction never committed)."""
    if not path.exists():
        return
    kept = 0
    offset = 0
    with path.open("rb") as handle:
        for line in handle:
            if kept == lines or not line.endswith(b"\n"):
                break
            kept += 1
            offset += len(line)
    with path.open("r+b") as handle:
        handle.truncate(offset)


def keep_upload(ctx: AppContext, path: Path, *, suffix: str) -> Path:
    """Move an uploaded file into the uploads folder, where it stays until its job ends."""
    ctx.settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    target = ctx.settings.uploads_dir / f"{uuid.uuid4().hex}{suffix}"
    os.replace(path, target)
    return target


def uploads_of(source: Source) -> list[Path]:
    """The uploaded files the service keeps for ``source`` until its job ends."""
    return source.uploads()


# -- jobs -----------------------------------------------------------------------------------
class JobKind(Protocol):
    """Runs one job of a kind a layer above registers (the learning layer's re-embedding) with
    the job's stored ``params``; True when done, False when ``should_stop()`` ended it early (the
    job then stays resumable)."""

    def __call__(
        self,
        ctx: AppContext,
        *,
        job_id: str,
        collection: str,
        params: dict[str, Any],
        should_stop: Callable[[], bool],
    ) -> bool: ...


class AfterImport(Protocol):
    """Runs when an import job read its whole source, before it shows as succeeded."""

    def __call__(self, ctx: AppContext, *, collection: str) -> None: ...


class JobRunner:
    """Runs import jobs, and the jobs of the ``kinds`` a layer above registers, one at a time in
    a background thread; progress is written to the DB. ``after_import`` runs at the end of each
    import that read its whole source."""

    def __init__(
        self,
        ctx: AppContext,
        *,
        kinds: Mapping[str, JobKind] | None = None,
        after_import: AfterImport | None = None,
    ) -> None:
        self.ctx = ctx
        self._kinds = dict(kinds or {})
        self._after_import = after_import
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-job")
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._pipelines: dict[str, Pipeline] = {}
        self._stopping = threading.Event()

    def recover(self) -> int:
        """Queue again the jobs a previous process left queued or running (they resume at their
        high-water mark; one whose source is gone is marked failed); return how many resumed."""
        with self.ctx.db.session() as session:
            rows = session.execute(
                select(
                    JobRecord.id, JobRecord.kind, JobRecord.params, JobRecord.collection_id, JobRecord.owner
                )
                .where(JobRecord.kind.in_(("import", *self._kinds)))
                .where(JobRecord.state.in_(("queued", "running")))
                .order_by(JobRecord.created_at, JobRecord.id)
            ).all()
        resumed = 0
        for job_id, kind, params, collection_id, owner in rows:
            mine = owner == self.ctx.store.journal.path.name  # stopped earlier in this process
            if owner and not mine and FileJournal.is_held(self.ctx.settings.journal_dir / owner):
                continue  # another live process (`cbir import`) is running it
            name = self._collection_name(collection_id)
            if kind != "import" and name is not None:
                self._mark_resumed(job_id)
                log.warning("resuming %s job %s of %s", kind, job_id, name)
                self._executor.submit(
                    self.run_task, kind=kind, job_id=job_id, collection=name, params=params or {}
                )
                resumed += 1
                continue
            try:
                source = from_params(params or {}, data_dir=self.ctx.settings.data_dir)
                missing = [p for p in uploads_of(source) if not p.exists()]
            except (KeyError, TypeError, ValueError) as exc:
                missing, source = [Path(str(exc))], None  # type: ignore[assignment]
            if name is None or source is None or missing:
                self._update(
                    job_id,
                    state="failed",
                    finished_at=utcnow(),
                    error="interrupted by a restart and its source is gone; images already stored "
                    "are kept and recognised as duplicates when imported again",
                )
                continue
            self._mark_resumed(job_id)
            log.warning("resuming import job %s into %s", job_id, name)
            self._executor.submit(self.run_import, job_id=job_id, collection=name, source=source)
            resumed += 1
        self._remove_stray_uploads()
        return resumed

    def _mark_resumed(self, job_id: str) -> None:
        with self.ctx.db.transaction() as session:
            session.execute(
                update(JobRecord).where(JobRecord.id == job_id).values(resumes=JobRecord.resumes + 1)
            )

    def _collection_name(self, collection_id: int | None) -> str | None:
        if collection_id is None:
            return None
        with self.ctx.db.session() as session:
            return session.scalar(select(CollectionRecord.name).where(CollectionRecord.id == collection_id))

    def _remove_stray_uploads(self) -> None:
        """Uploads no live job refers to (a crash between receiving a file and queueing its job)."""
        folder = self.ctx.settings.uploads_dir
        if not folder.is_dir():
            return
        with self.ctx.db.session() as session:
            live = session.scalars(select(JobRecord.params).where(JobRecord.state.in_(("queued", "running"))))
            referenced = {
                str(self.ctx.settings.data_dir / v)
                for params in live
                for key, v in (params or {}).items()
                if key in ("path", "manifest") and v
            }
        for path in folder.iterdir():
            if str(path) not in referenced:
                path.unlink(missing_ok=True)

    def create_job(self, *, collection: str, source: Source, creator: str = "anonymous") -> str:
        """``creator``: the scope of the key that asked for the job (its report needs it)."""
        job_id = uuid.uuid4().hex
        with self.ctx.db.transaction() as session:
            record = require_collection(session, collection)
            session.add(
                JobRecord(
                    id=job_id,
                    collection_id=record.id,
                    kind="import",
                    params={**describe(source, data_dir=self.ctx.settings.data_dir), "creator": creator},
                )
            )
        return job_id

    def submit_import(self, *, collection: str, source: Source, creator: str = "anonymous") -> str:
        """Record a queued job and run it in the background; returns its id at once."""
        job_id = self.create_job(collection=collection, source=source, creator=creator)
        self._executor.submit(self.run_import, job_id=job_id, collection=collection, source=source)
        return job_id

    def create_reembed_job(self, *, collection: str, spec: str, creator: str = "anonymous") -> str:
        job_id, params = uuid.uuid4().hex, {"embedder": spec, "creator": creator}
        with self.ctx.db.transaction() as session:
            record = require_collection(session, collection)
            session.add(JobRecord(id=job_id, collection_id=record.id, kind="reembed", params=params))
        return job_id

    def submit_reembed(self, *, collection: str, spec: str, creator: str = "anonymous") -> str:
        """Queue the switch of a collection to another embedder (see app.learning.reembed)."""
        job_id = self.create_reembed_job(collection=collection, spec=spec, creator=creator)
        self._executor.submit(self.run_reembed, job_id=job_id, collection=collection, spec=spec)
        return job_id

    def run_reembed(
        self, *, job_id: str, collection: str, spec: str, on_progress: Callable[[], None] | None = None
    ) -> None:
        self.run_task(
            kind="reembed",
            job_id=job_id,
            collection=collection,
            params={"embedder": spec},
            on_progress=on_progress,
        )

    def run_task(
        self,
        *,
        kind: str,
        job_id: str,
        collection: str,
        params: dict[str, Any],
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        """Run a job of a registered kind here; its state follows what the kind returns."""
        if self._cancel_requested(job_id):
            return

        def should_stop() -> bool:
            if on_progress is not None:
                on_progress()
            return self._cancel_requested(job_id) or self._stopping.is_set()

        try:
            run = self._kinds.get(kind)
            if run is None:
                raise RuntimeError(f"this process runs no {kind!r} jobs")
            done = run(self.ctx, job_id=job_id, collection=collection, params=params, should_stop=should_stop)
            if done:
                self._update(job_id, state="succeeded", finished_at=utcnow())
            elif self._cancel_requested(job_id):
                self._update(job_id, state="cancelled", finished_at=utcnow())
            # else: shutting down; the job stays running and resumes on the next start
        except Exception as exc:
            log.exception("%s job %s failed", kind, job_id)
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            self._update(job_id, state="failed", finished_at=utcnow(), error=detail)

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            pipelines = list(self._pipelines.values())
        for pipeline in pipelines:  # stop after the batch being written; the job stays resumable
            pipeline.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def run_import(
        self,
        *,
        job_id: str,
        collection: str,
        source: Source,
        on_progress: Callable[[dict[str, int], int | None], None] | None = None,
    ) -> None:
        ctx = self.ctx
        if self._cancel_requested(job_id):  # cancelled while queued
            self._discard_uploads(source)
            return
        try:
            record = get_job(ctx, job_id).record
            if record.state in FINAL_STATES:  # cancelled between queueing and now
                self._discard_uploads(source)
                return
            counts = {k: getattr(record, k) for k in ("done", "added", "duplicates", "failed")}
            errors: list[dict[str, Any]] = list(record.errors or [])
            start = record.cursor
            report = report_path(ctx, job_id)
            report.parent.mkdir(parents=True, exist_ok=True)
            _cut_report(report, start)
            settings = ctx.settings
            total = count_members(
                source,
                datasets_dir=settings.datasets_dir,
                data_dir=settings.data_dir,
                limits=Limits.of(settings),
            )
            now = utcnow()
            started = record.started_at
            if started is not None and record.updated_at is not None:
                # Resumed: keep the time it has worked, not the time it lay interrupted.
                started = now - (_aware(record.updated_at) - _aware(started))
            self._update(
                job_id,
                state="running",
                started_at=started or now,
                total=total,
                updated_at=now,
                owner=ctx.store.journal.path.name,
            )
            members = members_of(source, ctx.settings, on_total=lambda n: self._update(job_id, total=n))
            pipeline = Pipeline(ctx, collection)
            with self._lock:
                self._pipelines[job_id] = pipeline
            if self._stopping.is_set():  # a shutdown began while this job was counting its source
                pipeline.stop()

            committed = {"report_bytes": report.stat().st_size if report.exists() else 0}
            staged: dict[str, Any] = {}

            def in_transaction(session: Any, results: list[ItemResult], end: int) -> None:
                # Runs again if the transaction is retried: work on copies, adopt them after commit.
                new_counts, new_errors = dict(counts), list(errors)
                for result in results:
                    new_counts["done"] += 1
                    if result.status == "added":
                        new_counts["added"] += 1
                    elif result.status == "duplicate":
                        new_counts["duplicates"] += 1
                    else:
                        new_counts["failed"] += 1
                        if len(new_errors) < MAX_REPORTED_ERRORS:
                            new_errors.append(
                                {"item": result.name, "code": result.code, "detail": result.detail}
                            )
                # The report's lines go to disk before the commit; a restart cuts them back to the
                # cursor, so the report lists each committed member exactly once.
                with report.open("ab") as handle:
                    handle.truncate(committed["report_bytes"])
                    handle.write(_report_lines(results))
                    handle.flush()
                    os.fsync(handle.fileno())
                    staged.update(counts=new_counts, errors=new_errors, report_bytes=handle.tell())
                session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id)
                    .values(cursor=end, errors=new_errors, updated_at=utcnow(), **new_counts)
                )

            def after_commit(results: list[ItemResult], end: int) -> None:
                counts.update(staged["counts"])
                errors[:] = staged["errors"]
                committed["report_bytes"] = staged["report_bytes"]
                if on_progress:
                    on_progress(counts, total)

            try:
                finished = pipeline.run(
                    members,
                    start=start,
                    in_transaction=in_transaction,
                    after_commit=after_commit,
                    should_stop=lambda: (
                        self._cancel_requested(job_id) or pipeline.stopping or self._stopping.is_set()
                    ),
                )
            except BaseException:
                # A failed transaction may have written report lines: cut them back.
                _cut_report(report, get_job(ctx, job_id).record.cursor)
                raise
            finally:
                with self._lock:
                    self._pipelines.pop(job_id, None)
            with ctx.db.session() as session:
                ctx.indexes.flush(require_collection(session, collection).id)
            if self._cancel_requested(job_id):
                self._update(job_id, state="cancelled", finished_at=utcnow())
            elif finished:  # failed after all when a line says the source is unreadable (a bad manifest)
                if self._after_import is not None:  # before success shows
                    self._after_import(self.ctx, collection=collection)
                self._update(job_id, finished_at=utcnow(), total=counts["done"], **finished_state(errors))
            else:
                return  # the service is shutting down: the job stays running and resumes on start
        except Exception as exc:
            log.exception("import job %s failed", job_id)
            # A full or read-only disk says so by its code (insufficient_storage, read_only); what
            # earlier batches committed stays, and importing the archive again skips it.
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, CbirError):
                reason = f"{exc.code}: {exc.detail}"
            self._update(job_id, state="failed", finished_at=utcnow(), error=reason)
        self._discard_uploads(source)

    @staticmethod
    def _discard_uploads(source: Source) -> None:
        for path in uploads_of(source):
            path.unlink(missing_ok=True)

    def cancel(self, job_id: str) -> JobInfo:
        """Ask a queued or running job to stop after its current batch; what it stored stays."""
        info = get_job(self.ctx, job_id)
        if info.record.state in FINAL_STATES:
            raise JobFinished(f"job {job_id} has already {info.record.state}; there is nothing to cancel")
        with self._lock:
            self._cancelled.add(job_id)
        if info.record.state == "queued":  # it may never start: mark it now, the worker skips it
            self._update(job_id, state="cancelled", finished_at=utcnow())
        return get_job(self.ctx, job_id)

    def _cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def _update(self, job_id: str, **values: Any) -> None:
        with self.ctx.db.transaction() as session:
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(**values))


def _aware(moment: Any) -> Any:
    """SQLite returns naive UTC datetimes, PostgreSQL aware ones."""
    from datetime import UTC

    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
