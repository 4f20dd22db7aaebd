"""Background import jobs: state in the database, work in the staged pipeline, resumable.

A job's row holds its source (enough to open it again), its counters and a high-water mark
(``cursor``) that commits with every batch of rows. A job that a crash or restart interrupted is
picked up on the next start and resumes at its cursor, so nothing is read twice and nothing is
added twice; its per-file report is cut back to the cursor and continued.
"""

from __future__ import annotations

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
from app.core.errors import JobFinished
from app.data.records import CollectionRecord, JobRecord, utcnow
from app.data.storage import FileJournal
from app.ingest.import_run import AfterImport, ImportRunning, report_path, uploads_of
from app.ingest.job_status import FINAL_STATES, JOB_STATES, JobInfo, get_job, list_jobs, wait_for_job
from app.ingest.leases import Holdings, Leases
from app.ingest.pipeline import Pipeline
from app.ingest.sources.base import Source
from app.ingest.sources.kinds import describe, from_params

log = logging.getLogger(__name__)

__all__ = [
    "FINAL_STATES",
    "JOB_STATES",
    "JobInfo",
    "get_job",
    "list_jobs",
    "report_path",
    "uploads_of",
    "wait_for_job",
]


def keep_upload(ctx: AppContext, path: Path, *, suffix: str) -> Path:
    """Move an uploaded file into the uploads folder, where it stays until its job ends."""
    ctx.settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    target = ctx.settings.uploads_dir / f"{uuid.uuid4().hex}{suffix}"
    os.replace(path, target)
    return target


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


class JobRunner(ImportRunning):
    """Runs import jobs, and the jobs of the ``kinds`` a layer above registers, one at a time in
    a background thread; progress is written to the DB. ``after_import`` runs at the end of each
    import that read its whole source.

    Each job is claimed before it runs and held by a lease (app/ingest/leases.py): a job created
    here is held from its creation; with ``runs_jobs`` False (an API replica) jobs are created
    unowned and wait for a worker, which finds them with ``poll``. A job whose holder died is
    taken over by the next worker to poll (or by a start's ``recover``) at its high-water mark."""

    def __init__(
        self,
        ctx: AppContext,
        *,
        kinds: Mapping[str, JobKind] | None = None,
        after_import: AfterImport | None = None,
        runs_jobs: bool = True,
    ) -> None:
        self.ctx = ctx
        self.runs_jobs = runs_jobs
        self._kinds = dict(kinds or {})
        self._after_import = after_import
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-job")
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._pipelines: dict[str, Pipeline] = {}
        self._stopping = threading.Event()
        self.leases = Leases(
            ctx.db, owner=ctx.store.journal.path.name, seconds=ctx.settings.job_lease_seconds
        )
        self.holdings = Holdings(
            self.leases, poll=ctx.settings.job_poll_seconds, on_lost=self._stop_pipelines
        )
        self._poller: threading.Thread | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("import", *self._kinds)

    def _stop_pipelines(self, job_ids: set[str]) -> None:
        with self._lock:
            pipelines = [self._pipelines[j] for j in job_ids if j in self._pipelines]
        for pipeline in pipelines:
            pipeline.stop()

    # -- polling (workers) ------------------------------------------------------------------
    def start_polling(self, *, heartbeat: Path | None = None) -> None:
        """Look for claimable jobs in a background thread until ``shutdown``."""
        if self._poller is None:
            self._poller = threading.Thread(
                target=self.poll, kwargs={"heartbeat": heartbeat}, name="cbir-job-poll", daemon=True
            )
            self._poller.start()

    def poll(self, *, heartbeat: Path | None = None) -> None:
        """Claim and run jobs, one at a time, until ``shutdown``: queued ones no process holds and
        those whose holder's lease ran out. ``heartbeat``: a file touched at each look (a health
        check's sign of life)."""
        every = self.ctx.settings.job_poll_seconds
        while not self._stopping.is_set():
            if heartbeat is not None:
                heartbeat.touch()
            claimed = None
            if not self.holdings.held():
                try:
                    claimed = self.holdings.claim_next(self.kinds)
                except Exception:  # the database away for a moment: look again later
                    log.warning("could not look for jobs", exc_info=True)
            if claimed is not None:
                self._dispatch(
                    claimed.job_id,
                    claimed.kind,
                    claimed.params,
                    claimed.collection_id,
                    resumed=claimed.taken_over,
                )
                continue
            self._stopping.wait(every)

    def recover(self) -> int:
        """Queue again the jobs a previous process left queued or running (they resume at their
        high-water mark; one whose source is gone is marked failed); return how many resumed."""
        with self.ctx.db.session() as session:
            rows = session.execute(
                select(
                    JobRecord.id,
                    JobRecord.kind,
                    JobRecord.params,
                    JobRecord.collection_id,
                    JobRecord.owner,
                )
                .where(JobRecord.kind.in_(("import", *self._kinds)))
                .where(JobRecord.state.in_(("queued", "running")))
                .order_by(JobRecord.created_at, JobRecord.id)
            ).all()
        resumed = 0
        for job_id, kind, params, collection_id, owner in rows:
            if (
                owner
                and owner != self.leases.owner
                and FileJournal.is_held(self.ctx.settings.journal_dir / owner)
            ):
                continue  # another live process on this machine (`cbir import`) is running it
            # Its owner died on this machine (its journal was found unlocked), or its lease ran
            # out; a live worker elsewhere keeps it (the claim fails).
            dead = owner if owner in self.ctx.dead_owners else None
            if self.holdings.adopt(self.leases.claim(job_id, from_owner=dead)) is None:
                continue
            resumed += self._dispatch(job_id, kind, params, collection_id, resumed=True)
        self._remove_stray_uploads()
        return resumed

    def _dispatch(
        self,
        job_id: str,
        kind: str,
        params: dict[str, Any] | None,
        collection_id: int | None,
        *,
        resumed: bool,
    ) -> int:
        """Queue a job found in the database on this process's executor (its run claims it);
        1 when queued, 0 when it cannot run (marked failed, its source gone)."""
        name = self._collection_name(collection_id)
        if kind != "import" and name is not None:
            if resumed:
                self._mark_resumed(job_id)
                log.warning("resuming %s job %s of %s", kind, job_id, name)
            self._executor.submit(
                self.run_task, kind=kind, job_id=job_id, collection=name, params=params or {}
            )
            return 1
        try:
            source = from_params(params or {}, data_dir=self.ctx.settings.data_dir)
            missing = [p for p in uploads_of(source) if not p.exists()]
        except (KeyError, TypeError, ValueError) as exc:
            missing, source = [Path(str(exc))], None  # type: ignore[assignment]
        if name is None or source is None or missing:
            self._update_any(
                job_id,
                state="failed",
                finished_at=utcnow(),
                lease_until=None,
                error="interrupted by a restart and its source is gone; images already stored "
                "are kept and recognised as duplicates when imported again",
            )
            self.holdings.let_go(job_id)
            return 0
        if resumed:
            self._mark_resumed(job_id)
            log.warning("resuming import job %s into %s", job_id, name)
        assert source is not None
        self._executor.submit(self.run_import, job_id=job_id, collection=name, source=source)
        return 1

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

    def _create(self, *, collection: str, kind: str, params: dict[str, Any]) -> str:
        """A queued job: held by this process if it runs jobs, else left for a worker to claim."""
        job_id = uuid.uuid4().hex
        with self.ctx.db.transaction() as session:
            record = require_collection(session, collection)
            owned = self.leases.own_new() if self.runs_jobs else {}
            session.add(JobRecord(id=job_id, collection_id=record.id, kind=kind, params=params, **owned))
        if self.runs_jobs:
            self.holdings.hold(job_id)
        return job_id

    def create_job(self, *, collection: str, source: Source, creator: str = "anonymous") -> str:
        """``creator``: the scope of the key that asked for the job (its report needs it)."""
        params = {**describe(source, data_dir=self.ctx.settings.data_dir), "creator": creator}
        return self._create(collection=collection, kind="import", params=params)

    def submit_import(self, *, collection: str, source: Source, creator: str = "anonymous") -> str:
        """Record a queued job and run it in the background (here, or on a worker when this
        process runs no jobs); returns its id at once."""
        job_id = self.create_job(collection=collection, source=source, creator=creator)
        if self.runs_jobs:
            self._executor.submit(self.run_import, job_id=job_id, collection=collection, source=source)
        return job_id

    def create_reembed_job(self, *, collection: str, spec: str, creator: str = "anonymous") -> str:
        return self._create(
            collection=collection, kind="reembed", params={"embedder": spec, "creator": creator}
        )

    def submit_reembed(self, *, collection: str, spec: str, creator: str = "anonymous") -> str:
        """Queue the switch of a collection to another embedder (see app.learning.reembed)."""
        job_id = self.create_reembed_job(collection=collection, spec=spec, creator=creator)
        if self.runs_jobs:
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
        if self._cancel_requested(job_id) or self.holdings.claim(job_id) is None:
            self.holdings.let_go(job_id)
            return

        def should_stop() -> bool:
            if on_progress is not None:
                on_progress()
            return self._cancel_requested(job_id) or self._stopping.is_set() or self.holdings.lost(job_id)

        try:
            run = self._kinds.get(kind)
            if run is None:
                raise RuntimeError(f"this process runs no {kind!r} jobs")
            done = run(self.ctx, job_id=job_id, collection=collection, params=params, should_stop=should_stop)
            if done:
                self._finish(job_id, state="succeeded")
            elif self._cancel_requested(job_id):
                self._finish(job_id, state="cancelled")
            # else: shutting down (the job stays running and resumes on the next start or on
            # another worker), or another worker took it over
        except Exception as exc:
            log.exception("%s job %s failed", kind, job_id)
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            self._finish(job_id, state="failed", error=detail)
        finally:
            self.holdings.let_go(job_id)

    def request_stop(self) -> None:
        """Make ``poll`` return (a signal handler's part: it only sets a flag)."""
        self._stopping.set()

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            pipelines = list(self._pipelines.values())
        for pipeline in pipelines:  # stop after the batch being written; the job stays resumable
            pipeline.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._poller is not None:
            self._poller.join(timeout=10)
        self.holdings.stop()

    def cancel(self, job_id: str) -> JobInfo:
        """Ask a queued or running job to stop after its current batch; what it stored stays."""
        info = get_job(self.ctx, job_id)
        if info.record.state in FINAL_STATES:
            raise JobFinished(f"job {job_id} has already {info.record.state}; there is nothing to cancel")
        with self._lock:
            self._cancelled.add(job_id)
        # Whichever process holds it (this one or a worker elsewhere) sees the request at its next
        # look (CBIR_JOB_POLL_SECONDS) and stops after its current batch.
        self.leases.request_cancel(job_id)
        if info.record.state == "queued":  # it may never start: mark it now, its claim then fails
            with self.ctx.db.transaction() as session:
                session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id)
                    .where(JobRecord.state == "queued")
                    .values(state="cancelled", finished_at=utcnow(), lease_until=None)
                )
        return get_job(self.ctx, job_id)

    def _cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled or self.holdings.cancel_asked(job_id)

    def _update(self, job_id: str, **values: Any) -> None:
        """Write to a job this process holds (fenced: nothing if another worker took it over)."""
        with self.ctx.db.transaction() as session:
            session.execute(
                update(JobRecord).where(JobRecord.id == job_id).where(self.leases.mine()).values(**values)
            )

    def _finish(self, job_id: str, **values: Any) -> None:
        """End a job this process holds, and its lease."""
        self._update(job_id, finished_at=utcnow(), lease_until=None, **values)

    def _update_any(self, job_id: str, **values: Any) -> None:
        with self.ctx.db.transaction() as session:
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(**values))
