"""Costly one-shot work as background jobs: an evaluation or a whitening over the synchronous cost
budget (app/embedding/cost.py).

Each run is a row of the jobs table (kind ``evaluate`` or ``whiten``), so ``GET /jobs/{id}`` shows
it and ``POST /jobs/{id}/cancel`` stops it. Runs go one at a time on a thread of their own and
check a cancellation token between batches: a cancel, or the service shutting down, stops them
within about a second. Unlike imports they are not resumed: what they compute is cheap to ask for
again and costly to keep half-done, so a start marks failed the runs of processes that are gone.

Several replicas share the jobs table: a row records its ``owner`` (the journal file its process
holds locked while it lives, as import jobs do), a start leaves alone the runs of live owners, a
cancel that reaches a replica not running the job marks the row and the owner's token notices it
(it looks at the row about once a second), and a runner never writes over a row that something
else has ended.
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

from sqlalchemy import select, update

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.cancel import CancelToken
from app.core.errors import Cancelled, CbirError, JobFinished, JobNotFinished, JobNotFound
from app.data.records import JobRecord, utcnow
from app.data.storage import FileJournal, write_atomic
from app.ingest.jobs import FINAL_STATES, JobInfo, get_job

log = logging.getLogger(__name__)

KINDS = ("evaluate", "whiten")
INTERRUPTED = "interrupted by a restart or shutdown before it finished; start it again"
LIVE = ("queued", "running")
CANCELLED = "the job was cancelled"
# The work, called with ``token=``: the result to keep (JSON-serialisable), or None.
Work = Callable[..., dict[str, Any] | None]


def result_path(ctx: AppContext, job_id: str) -> Path:
    return ctx.settings.data_dir / "evaluations" / "jobs" / f"{job_id}.json"


class TaskRunner:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._queue: queue.Queue[tuple[str, Work, CancelToken] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._tokens: dict[str, CancelToken] = {}
        self._stopping = CancelToken()
        # A daemon: if work ever ignored its token, it could not hold the process at exit.
        self._thread = threading.Thread(target=self._loop, name="cbir-task", daemon=True)
        self._thread.start()

    @property
    def owner(self) -> str:
        """This process's name in the jobs table: its journal file, locked while it lives."""
        return self.ctx.store.journal.path.name

    def recover(self) -> int:
        """Mark failed the runs that processes now gone left queued or running (a live replica's,
        and this runner's own, are left alone); how many there were."""
        with self.ctx.db.session() as session:
            rows = session.execute(
                select(JobRecord.id, JobRecord.owner).where(
                    JobRecord.kind.in_(KINDS), JobRecord.state.in_(LIVE)
                )
            ).all()
        journals = self.ctx.settings.journal_dir
        with self._lock:
            gone = [
                job_id
                for job_id, owner in rows
                if job_id not in self._tokens
                and not (owner and owner != self.owner and FileJournal.is_held(journals / owner))
            ]
        for job_id in gone:
            self._finish(job_id, state="failed", error=INTERRUPTED)
        return len(gone)

    def submit(self, *, kind: str, collection: str, params: dict[str, Any], work: Work, creator: str) -> str:
        """Record a queued job of ``kind`` and run ``work`` in the background; its id at once.
        ``creator``: the scope of the key that asked (app/api/job_access.py), which its cancel,
        report and events need."""
        assert kind in KINDS
        job_id = uuid.uuid4().hex
        with self.ctx.db.transaction() as session:
            record = require_collection(session, collection)
            session.add(
                JobRecord(
                    id=job_id,
                    collection_id=record.id,
                    kind=kind,
                    params={**params, "creator": creator},
                    owner=self.owner,
                )
            )
        token = CancelToken(parent=self._stopping, probe=lambda: self._ended_elsewhere(job_id))
        with self._lock:
            self._tokens[job_id] = token
        self._queue.put((job_id, work, token))
        return job_id

    def cancel(self, job_id: str) -> JobInfo:
        """Stop a queued or running job at its next check, wherever it runs; 409 job_finished once
        it has ended, or once it is making its result permanent."""
        info = get_job(self.ctx, job_id)
        if info.record.state in FINAL_STATES:
            raise JobFinished(f"job {job_id} has already {info.record.state}; there is nothing to cancel")
        with self._lock:
            token = self._tokens.get(job_id)
        if token is not None and not token.cancel(CANCELLED):
            raise JobFinished(f"job {job_id} is storing its result; it can no longer be cancelled")
        if token is None or info.record.state == "queued":
            # Queued here, it may wait behind another: mark it now. Run by another process: the
            # mark is what its token looks at.
            self._finish(job_id, state="cancelled")
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
        self._queue.put(None)
        self._thread.join(timeout)

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
                if result is not None:
                    payload = json.dumps(result, allow_nan=False).encode("utf-8")
                    write_atomic(result_path(self.ctx, job_id), payload, fsync=False)
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
        """Why the job should stop, when its row says it has ended (a cancel that reached another
        replica) or is gone (its collection was deleted); None while it is still live."""
        with self.ctx.db.session() as session:
            state = session.scalar(select(JobRecord.state).where(JobRecord.id == job_id))
        if state is None:
            return "the job was deleted with its collection"
        return CANCELLED if state == "cancelled" else None if state in LIVE else f"the job has {state}"

    def _finish(self, job_id: str, **values: Any) -> bool:
        return self._update(job_id, from_=LIVE, finished_at=utcnow(), **values)

    def _update(self, job_id: str, *, from_: tuple[str, ...], **values: Any) -> bool:
        """Set ``values`` on the job while it is in one of the states ``from_``: never over a row
        another process has ended. Whether it was."""
        with self.ctx.db.transaction() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.state.in_(from_))
                .values(updated_at=utcnow(), **values)
            )
        return bool(getattr(result, "rowcount", 0))
