"""Costly one-shot work as background jobs: an evaluation or a whitening over the synchronous cost
budget (app/services/cost.py).

Each run is a row of the jobs table (kind ``evaluate`` or ``whiten``), so ``GET /jobs/{id}`` shows
it and ``POST /jobs/{id}/cancel`` stops it. Runs go one at a time on a thread of their own and
check a cancellation token between batches: a cancel, or the service shutting down, stops them
within about a second. Unlike imports they are not resumed: what they compute is cheap to ask for
again and costly to keep half-done, so a restart marks an interrupted one failed.
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

from sqlalchemy import update

from app.cancel import CancelToken
from app.context import AppContext
from app.errors import Cancelled, CbirError, JobFinished, JobNotFinished, JobNotFound
from app.records import JobRecord, utcnow
from app.services.collections import require_collection
from app.services.jobs import FINAL_STATES, JobInfo, get_job
from app.storage import write_atomic

log = logging.getLogger(__name__)

KINDS = ("evaluate", "whiten")
INTERRUPTED = "interrupted by a restart or shutdown before it finished; start it again"
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

    def recover(self) -> int:
        """Mark the runs a previous process left queued or running failed; how many there were."""
        with self.ctx.db.transaction() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.kind.in_(KINDS), JobRecord.state.in_(("queued", "running")))
                .values(state="failed", error=INTERRUPTED, finished_at=utcnow())
            )
        return int(getattr(result, "rowcount", 0) or 0)

    def submit(self, *, kind: str, collection: str, params: dict[str, Any], work: Work) -> str:
        """Record a queued job of ``kind`` and run ``work`` in the background; its id at once."""
        assert kind in KINDS
        job_id = uuid.uuid4().hex
        with self.ctx.db.transaction() as session:
            record = require_collection(session, collection)
            session.add(JobRecord(id=job_id, collection_id=record.id, kind=kind, params=params))
        token = CancelToken(parent=self._stopping)
        with self._lock:
            self._tokens[job_id] = token
        self._queue.put((job_id, work, token))
        return job_id

    def owns(self, job_id: str) -> bool:
        """Whether the job is one of this runner's, queued or running."""
        with self._lock:
            return job_id in self._tokens

    def cancel(self, job_id: str) -> JobInfo:
        """Stop a queued or running job at its next check; 409 job_finished once it has ended."""
        info = get_job(self.ctx, job_id)
        if info.record.state in FINAL_STATES:
            raise JobFinished(f"job {job_id} has already {info.record.state}; there is nothing to cancel")
        with self._lock:
            token = self._tokens.get(job_id)
        if token is not None:
            token.cancel("the job was cancelled")
        if info.record.state == "queued":  # it may be waiting behind another: mark it now
            self._update(job_id, state="cancelled", finished_at=utcnow())
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
            self._run(*item)

    def _run(self, job_id: str, work: Work, token: CancelToken) -> None:
        try:
            if token.cancelled:  # cancelled while queued, or shutting down: recover() marks those
                return
            self._update(job_id, state="running", started_at=utcnow(), updated_at=utcnow())
            try:
                result = work(token=token)
                if result is not None:
                    payload = json.dumps(result, allow_nan=False).encode("utf-8")
                    write_atomic(result_path(self.ctx, job_id), payload, fsync=False)
                self._update(job_id, state="succeeded", finished_at=utcnow())
            except Cancelled:
                stopped = self._stopping.cancelled
                self._update(
                    job_id,
                    state="failed" if stopped else "cancelled",
                    error=INTERRUPTED if stopped else None,
                    finished_at=utcnow(),
                )
            except CbirError as exc:
                self._update(job_id, state="failed", error=f"{exc.code}: {exc.detail}", finished_at=utcnow())
            except Exception as exc:
                log.exception("job %s failed", job_id)
                self._update(
                    job_id, state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=utcnow()
                )
        except Exception:  # the database itself failed: the job stays as it is; recover() ends it
            log.exception("job %s could not be recorded", job_id)
        finally:
            with self._lock:
                self._tokens.pop(job_id, None)

    def _update(self, job_id: str, **values: Any) -> None:
        with self.ctx.db.transaction() as session:
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(**values))
