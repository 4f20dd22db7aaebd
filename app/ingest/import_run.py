"""Running one import job: its source read in the staged pipeline from its high-water mark, each
batch's rows, counters and cursor committed together (fenced by the job's lease), its per-file
report kept in step with the cursor.

``ImportRunning`` is the part of ``app.ingest.jobs.JobRunner`` that runs an import it has
claimed; the runner decides what runs where (claims, leases, queues).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.errors import CbirError
from app.data.records import JobRecord, utcnow
from app.ingest.job_status import FINAL_STATES, get_job
from app.ingest.leases import Holdings, LeaseLost, Leases
from app.ingest.pipeline import Pipeline
from app.ingest.sources.base import Limits, Source
from app.ingest.sources.kinds import count_members, members_of
from app.ingest.sources.manifests import finished_state
from app.ingest.store import ItemResult

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 1000


class AfterImport(Protocol):
    """Runs when an import job read its whole source, before it shows as succeeded."""

    def __call__(self, ctx: AppContext, *, collection: str) -> None: ...


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


class ImportRunning:
    """Runs claimed import jobs; mixed into ``JobRunner``, which provides these attributes."""

    ctx: AppContext
    leases: Leases
    holdings: Holdings
    _lock: threading.Lock
    _pipelines: dict[str, Pipeline]
    _stopping: threading.Event
    _after_import: AfterImport | None

    def _cancel_requested(self, job_id: str) -> bool:
        raise NotImplementedError

    def _update(self, job_id: str, **values: Any) -> None:
        raise NotImplementedError

    def _finish(self, job_id: str, **values: Any) -> None:
        raise NotImplementedError

    def _after_takeover(self, job_id: str, collection: str) -> None:
        """The job's last holder died mid-batch: its uncommitted files may lie on the shared store
        and its last committed rows may lack their vectors in the vector store. Put both right
        before going on from the high-water mark."""
        if not self.holdings.taken_over(job_id):
            return
        from app.context import remove_unfinished_writes

        remove_unfinished_writes(self.ctx)
        with self.ctx.db.session() as session:
            record = require_collection(session, collection)
        added, removed = self.ctx.indexes.reconcile(record)
        log.warning(
            "took over job %s of %s from a stopped worker: %d vectors re-added, %d removed",
            job_id,
            collection,
            added,
            removed,
        )

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
            self.holdings.let_go(job_id)
            self._discard_uploads(source)
            return
        if self.holdings.claim(job_id) is None:  # it ended, or another live process holds it
            self.holdings.let_go(job_id)
            if get_job(ctx, job_id).record.state in FINAL_STATES:  # cancelled while queued
                self._discard_uploads(source)
            return
        try:
            self._run_import(job_id=job_id, collection=collection, source=source, on_progress=on_progress)
        finally:
            self.holdings.let_go(job_id)

    def _run_import(
        self,
        *,
        job_id: str,
        collection: str,
        source: Source,
        on_progress: Callable[[dict[str, int], int | None], None] | None,
    ) -> None:
        ctx = self.ctx
        try:
            record = get_job(ctx, job_id).record
            if record.state in FINAL_STATES:  # cancelled between queueing and now
                self._discard_uploads(source)
                return
            self._after_takeover(job_id, collection)
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
                moved = session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id)
                    .where(self.leases.mine())  # fenced: a worker that lost the job moves nothing
                    .values(cursor=end, errors=new_errors, updated_at=utcnow(), **new_counts)
                ).rowcount
                if not moved:
                    raise LeaseLost(f"job {job_id} was taken over by another worker")
                # A cancel asked of any replica stops the job after this batch.
                if session.scalar(select(JobRecord.cancel_requested).where(JobRecord.id == job_id)):
                    self.holdings.cancelled({job_id})

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
                        self._cancel_requested(job_id)
                        or pipeline.stopping
                        or self._stopping.is_set()
                        or self.holdings.lost(job_id)
                    ),
                )
            except BaseException as exc:
                if isinstance(exc, LeaseLost):  # the report is the new holder's now
                    raise
                # A failed transaction may have written report lines: cut them back.
                _cut_report(report, get_job(ctx, job_id).record.cursor)
                raise
            finally:
                with self._lock:
                    self._pipelines.pop(job_id, None)
            with ctx.db.session() as session:
                ctx.indexes.flush(require_collection(session, collection).id)
            if self.holdings.lost(job_id):
                return  # another worker holds it now; it goes on from the cursor
            if self._cancel_requested(job_id):
                self._finish(job_id, state="cancelled")
            elif finished:  # failed after all when a line says the source is unreadable (a bad manifest)
                if self._after_import is not None:  # before success shows
                    self._after_import(self.ctx, collection=collection)
                self._finish(job_id, total=counts["done"], **finished_state(errors))
            else:
                return  # shutting down: the job stays running and resumes on start or elsewhere
        except LeaseLost:
            log.warning("import job %s was taken over by another worker; stopped here", job_id)
            return
        except Exception as exc:
            log.exception("import job %s failed", job_id)
            # A full or read-only disk says so by its code (insufficient_storage, read_only); what
            # earlier batches committed stays, and importing the archive again skips it.
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, CbirError):
                reason = f"{exc.code}: {exc.detail}"
            self._finish(job_id, state="failed", error=reason)
        self._discard_uploads(source)

    @staticmethod
    def _discard_uploads(source: Source) -> None:
        for path in uploads_of(source):
            path.unlink(missing_ok=True)


def uploads_of(source: Source) -> list[Path]:
    """The uploaded files the service keeps for ``source`` until its job ends."""
    return source.uploads()


def _aware(moment: Any) -> Any:
    """SQLite returns naive UTC datetimes, PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
