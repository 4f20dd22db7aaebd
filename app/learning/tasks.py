"""Costly one-shot work as background jobs: an evaluation or a whitening over the synchronous cost
budget (app/embedding/cost.py).

Each run is a row of the jobs table (kind ``evaluate`` or ``whiten``), so ``GET /jobs/{id}`` shows
it and ``POST /jobs/{id}/cancel`` stops it; its result is a file in the data folder
(``result_path``), which every replica reads. Where it runs follows the role:

- role ``all``: the process that received the request runs it, one at a time on a thread of its
  own. Its row is held like an import's (app/ingest/leases.py): ``owner`` and a lease this runner
  renews while the job is queued here or running.
- role ``api``: the row is queued unowned and a ``cbir worker`` claims it (app/learning/job_kinds.py
  registers the kinds; ``run_claimed`` runs them), with what the work needs kept beside the
  result (``inputs_path``) when the params do not say it all.

Work checks a cancellation token between batches: a cancel, or the process shutting down, stops
it within about a second. A cancel that reaches a replica not running the job asks through the row
(``cancel_requested``), which the holder looks at about once a second. Unlike imports these jobs
are not resumed: what they compute is cheap to ask for again and costly to keep half-done, so a
job whose holder is gone (known dead, or its lease ran out) ends ``failed`` with ``INTERRUPTED``,
whether a start's ``recover`` or a worker taking it over finds it. A runner never writes over a
row that something else has ended or taken over.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.cancel import CancelToken
from app.core.errors import Cancelled, CbirError, JobFinished, JobNotFinished, JobNotFound
from app.data.records import JobRecord, utcnow
from app.data.storage import FileJournal, write_atomic
from app.ingest.jobs import FINAL_STATES, JobInfo, get_job
from app.ingest.leases import LeaseKeeper, Leases

log = logging.getLogger(__name__)

KINDS = ("evaluate", "whiten", "duplicates")
INTERRUPTED = "interrupted by a restart or shutdown before it finished; start it again"
LIVE = ("queued", "running")
CANCELLED = "the job was cancelled"
TAKEN_OVER = "another worker took the job over"
# The work, called with ``token=``: the result to keep (JSON-serialisable), or None.
Work = Callable[..., dict[str, Any] | None]


class JobInterrupted(CbirError):
    code, title = "interrupted", "Interrupted"


def result_path(ctx: AppContext, job_id: str) -> Path:
    return ctx.settings.data_dir / "evaluations" / "jobs" / f"{job_id}.json"


def inputs_path(ctx: AppContext, job_id: str) -> Path:
    """What a worker needs to run the job beyond its params (an evaluation's ground truth)."""
    return ctx.settings.data_dir / "evaluations" / "jobs" / f"{job_id}.inputs.json"


def read_inputs(ctx: AppContext, job_id: str) -> dict[str, Any]:
    path = inputs_path(ctx, job_id)
    if not path.is_file():
        raise CbirError(f"the inputs of job {job_id} are gone from the data folder ({path.name})")
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _keep_result(ctx: AppContext, job_id: str, result: dict[str, Any] | None) -> None:
    if result is not None:
        payload = json.dumps(result, allow_nan=False).encode("utf-8")
        write_atomic(result_path(ctx, job_id), payload, fsync=False)


def _now(ctx: AppContext) -> Any:
    """Now as lease columns are compared (app/ingest/leases.py): the database's clock on
    PostgreSQL, this process's on SQLite."""
    return func.now() if ctx.db.engine.dialect.name == "postgresql" else utcnow()


def _unheld(ctx: AppContext) -> ColumnElement[bool]:
    """No live process holds the job: unowned, held without a lease, or its lease ran out."""
    return or_(
        JobRecord.owner.is_(None),
        JobRecord.lease_until.is_(None),
        JobRecord.lease_until < _now(ctx),
    )


class TaskRunner:
    """``runs_jobs`` False (role ``api``): ``submit`` queues the job for a worker."""

    def __init__(self, ctx: AppContext, *, runs_jobs: bool = True) -> None:
        self.ctx = ctx
        self.runs_jobs = runs_jobs
        self._queue: queue.Queue[tuple[str, Work, CancelToken] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._tokens: dict[str, CancelToken] = {}
        self._stopping = CancelToken()
        self.leases = Leases(ctx.db, owner=self.owner, seconds=ctx.settings.job_lease_seconds)
        self._keeper: LeaseKeeper | None = None
        self._thread: threading.Thread | None = None
        if runs_jobs:
            # Renews the leases of the jobs queued here or running; hears of cancels asked
            # elsewhere and of jobs taken over. Stopped without giving leases up: the job runner
            # of this process shares the owner name and gives up its own.
            self._keeper = LeaseKeeper(
                self.leases,
                held=self._held,
                on_lost=lambda ids: self._stop_tokens(ids, TAKEN_OVER),
                on_cancel=lambda ids: self._stop_tokens(ids, CANCELLED),
                poll=ctx.settings.job_poll_seconds,
            )
            # A daemon: if work ever ignored its token, it could not hold the process at exit.
            self._thread = threading.Thread(target=self._loop, name="cbir-task", daemon=True)
            self._thread.start()

    @property
    def owner(self) -> str:
        """This process's name in the jobs table: its journal file, locked while it lives."""
        return self.ctx.store.journal.path.name

    def _held(self) -> set[str]:
        with self._lock:
            return set(self._tokens)

    def _stop_tokens(self, job_ids: set[str], reason: str) -> None:
        with self._lock:
            tokens = [self._tokens[j] for j in job_ids if j in self._tokens]
        for token in tokens:
            token.cancel(reason)

    def recover(self) -> int:
        """Mark failed the runs left queued or running by processes now gone (known dead here, or
        whose lease ran out); how many there were. Left alone: this runner's own, those a live
        process holds (its lease runs, or its journal is locked on this machine), and those
        queued unowned for a worker."""
        with self.ctx.db.session() as session:
            rows = session.execute(
                select(JobRecord.id, JobRecord.owner, JobRecord.state).where(
                    JobRecord.kind.in_(KINDS), JobRecord.state.in_(LIVE)
                )
            ).all()
        journals = self.ctx.settings.journal_dir
        dead = sorted(self.ctx.dead_owners)
        with self._lock:
            candidates = [
                job_id
                for job_id, owner, state in rows
                if job_id not in self._tokens
                and not (owner is None and state == "queued")
                and not (owner and owner != self.owner and FileJournal.is_held(journals / owner))
            ]
        if not candidates:
            return 0
        with self.ctx.db.transaction() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.id.in_(candidates), JobRecord.state.in_(LIVE))
                .where(or_(JobRecord.owner.in_(dead), _unheld(self.ctx)))
                .values(
                    state="failed",
                    error=INTERRUPTED,
                    finished_at=utcnow(),
                    updated_at=utcnow(),
                    lease_until=None,
                )
                .execution_options(synchronize_session=False)
            )
        return int(getattr(result, "rowcount", 0) or 0)

    def submit(
        self,
        *,
        kind: str,
        collection: str,
        params: dict[str, Any],
        work: Work,
        creator: str,
        inputs: dict[str, Any] | None = None,
    ) -> str:
        """Record a queued job of ``kind`` and run ``work`` in the background here, or leave it
        for a worker (which rebuilds the work from ``params`` and ``inputs``); its id at once.
        ``creator``: the scope of the key that asked (app/api/job_access.py), which its cancel,
        report and events need."""
        assert kind in KINDS
        job_id = uuid.uuid4().hex
        with self.ctx.db.transaction() as session:
            record = require_collection(session, collection)
            if not self.runs_jobs and inputs is not None:  # there before any worker can claim it
                payload = json.dumps(inputs, allow_nan=False).encode("utf-8")
                write_atomic(inputs_path(self.ctx, job_id), payload, fsync=False)
            owned = self.leases.own_new() if self.runs_jobs else {}
            session.add(
                JobRecord(
                    id=job_id,
                    collection_id=record.id,
                    kind=kind,
                    params={**params, "creator": creator},
                    **owned,
                )
            )
        if not self.runs_jobs:
            return job_id
        token = CancelToken(parent=self._stopping, probe=lambda: self._ended_elsewhere(job_id))
        with self._lock:
            self._tokens[job_id] = token
        self._queue.put((job_id, work, token))
        return job_id

    def cancel(self, job_id: str) -> JobInfo:
        """Stop a queued or running job at its next check, wherever it runs; 409 job_finished once
        it has ended, or once it is making its result permanent here."""
        info = get_job(self.ctx, job_id)
        if info.record.state in FINAL_STATES:
            raise JobFinished(f"job {job_id} has already {info.record.state}; there is nothing to cancel")
        with self._lock:
            token = self._tokens.get(job_id)
        if token is not None and not token.cancel(CANCELLED):
            raise JobFinished(f"job {job_id} is storing its result; it can no longer be cancelled")
        # Whichever process holds it sees the request at its next look and ends it cancelled.
        self.leases.request_cancel(job_id)
        # Queued (here, or waiting for a worker), or held by no live process: it may never look,
        # so mark it now. Running in a live process: that process ends it.
        with self.ctx.db.transaction() as session:
            session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.state.in_(LIVE))
                .where(or_(JobRecord.state == "queued", _unheld(self.ctx)))
                .values(state="cancelled", finished_at=utcnow(), updated_at=utcnow(), lease_until=None)
                .execution_options(synchronize_session=False)
            )
        return get_job(self.ctx, job_id)

    def result(self, job_id: str, *, kind: str, collection: str) -> dict[str, Any]:
        """What a succeeded ``kind`` job of the collection kept; 409 job_not_finished before that
        (or when it failed or was cancelled)."""
        info = get_job(self.ctx, job_id)
        record = info.record
        path = result_path(self.ctx, job_id)
        if record.kind != kind or info.collection != collection:
            raise JobNotFound(f"collection {collection!r} has no {kind} job {job_id!r}")
        if record.state != "succeeded":
            why = f": {record.error}" if record.error else ""
            raise JobNotFinished(
                f"job {job_id} is {record.state}{why}; its result comes when it has succeeded"
            )
        if not path.is_file():
            raise JobNotFound(f"job {job_id} kept no result")
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the running job at its next check (about a second) and wait for it."""
        self._stopping.cancel("the service is shutting down")
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
        if self._keeper is not None:
            self._keeper.stop()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            job_id, work, token = item
            self._run(job_id=job_id, work=work, token=token)

    def _run(self, *, job_id: str, work: Work, token: CancelToken) -> None:
        try:
            if token.cancelled:  # cancelled while queued, or shutting down: recover() marks those
                return
            if not self._update(job_id, from_=("queued",), state="running", started_at=utcnow()):
                return  # ended meanwhile by another process (a cancel there, its collection deleted)
            try:
                result = work(token=token)
                token.settle()  # a cancel accepted until now wins over the result
                _keep_result(self.ctx, job_id, result)
                self._finish(job_id, state="succeeded")
            except Cancelled:
                stopped = self._stopping.cancelled and token.reason == self._stopping.reason
                self._finish(
                    job_id,
                    state="failed" if stopped else "cancelled",
                    error=INTERRUPTED if stopped else None,
                )
            except CbirError as exc:
                self._finish(job_id, state="failed", error=f"{exc.code}: {exc.detail}")
            except Exception as exc:
                log.exception("job %s failed", job_id)
                self._finish(job_id, state="failed", error=f"{type(exc).__name__}: {exc}")
        except Exception:  # the database itself failed: the job stays as it is; recover() ends it
            log.exception("job %s could not be recorded", job_id)
        finally:
            with self._lock:
                self._tokens.pop(job_id, None)

    def _ended_elsewhere(self, job_id: str) -> str | None:
        """Why the job should stop, when its row says it was cancelled (through another replica),
        has ended, is held by another process or is gone (its collection was deleted); None while
        it is still live and ours."""
        with self.ctx.db.session() as session:
            row = session.execute(
                select(JobRecord.state, JobRecord.cancel_requested, JobRecord.owner).where(
                    JobRecord.id == job_id
                )
            ).first()
        if row is None:
            return "the job was deleted with its collection"
        state, cancel_requested, owner = row
        if cancel_requested or state == "cancelled":
            return CANCELLED
        if state not in LIVE:
            return f"the job has {state}"
        return TAKEN_OVER if owner != self.owner else None

    def _finish(self, job_id: str, **values: Any) -> bool:
        return self._update(job_id, from_=LIVE, finished_at=utcnow(), lease_until=None, **values)

    def _update(self, job_id: str, *, from_: tuple[str, ...], **values: Any) -> bool:
        """Set ``values`` on the job while this runner holds it and it is in one of the states
        ``from_``: never over a row another process has ended or taken over. Whether it was."""
        with self.ctx.db.transaction() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.state.in_(from_), self.leases.mine())
                .values(updated_at=utcnow(), **values)
            )
        return bool(getattr(result, "rowcount", 0))


# -- run by a worker ------------------------------------------------------------------------------
def run_claimed(ctx: AppContext, *, job_id: str, work: Work, should_stop: Callable[[], bool]) -> bool:
    """Run ``work`` as the job ``job_id``, which this process claimed (app/ingest/jobs.py's
    ``run_task``, whose state handling follows what this returns): True when its result is kept;
    False when a cancel stopped it (ended ``cancelled`` here) or it is no longer this process's.
    ``JobInterrupted`` when a holder that is gone had started it (these jobs are not resumed)
    or this process is shutting down; another ``CbirError`` when the work failed."""
    owner = ctx.store.journal.path.name
    mine = and_(JobRecord.id == job_id, JobRecord.owner == owner)
    with ctx.db.transaction() as session:
        started = session.execute(
            update(JobRecord)
            .where(mine, JobRecord.state == "queued")
            .values(state="running", started_at=utcnow(), updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    if not getattr(started, "rowcount", 0):
        with ctx.db.session() as session:
            state = session.scalar(select(JobRecord.state).where(mine))
        if state != "running":
            if state is not None:  # ours and ended: cancelled while queued
                _forget_inputs(ctx, job_id)
            return False
        _forget_inputs(ctx, job_id)
        raise JobInterrupted(INTERRUPTED)  # started by a holder that died or froze: not resumed
    token = CancelToken(probe=lambda: CANCELLED if should_stop() else None)
    try:
        result = work(token=token)
        token.settle()  # a cancel seen until now wins over the result
        _keep_result(ctx, job_id, result)
        return True
    except Cancelled:
        with ctx.db.session() as session:
            row = session.execute(select(JobRecord.state, JobRecord.cancel_requested).where(mine)).first()
        if row is None or row[0] not in LIVE:
            return False  # taken over, ended or deleted elsewhere
        if not row[1]:
            raise JobInterrupted(INTERRUPTED) from None  # this worker is shutting down
        with ctx.db.transaction() as session:
            session.execute(
                update(JobRecord)
                .where(mine, JobRecord.state.in_(LIVE))
                .values(state="cancelled", finished_at=utcnow(), updated_at=utcnow(), lease_until=None)
                .execution_options(synchronize_session=False)
            )
        return False
    except JobInterrupted:
        raise
    except CbirError as exc:  # as the in-process runner words it
        raise CbirError(f"{exc.code}: {exc.detail}") from exc
    finally:
        _forget_inputs(ctx, job_id)


def _forget_inputs(ctx: AppContext, job_id: str) -> None:
    inputs_path(ctx, job_id).unlink(missing_ok=True)
