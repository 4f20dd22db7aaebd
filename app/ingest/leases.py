"""Jobs claimed, not owned: any process that runs jobs may take one, and holds it by a lease.

A job row names its ``owner`` (the journal file of the process holding it, unique per process) and
``lease_until``. The owner renews the lease while the job is queued in its memory or running; a
job whose lease has run out belongs to a process that died (or froze), and the next worker to look
claims it and resumes it at its high-water mark. Every write a job makes to its own row is
*fenced*: it names the owner, so a process that lost its lease (a long pause, a network cut) can
no longer move the job's cursor or end it; its transaction finds no row and rolls back.

Claims are one conditional UPDATE each, so two processes can never both win one; on PostgreSQL the
search for the next job also locks the row it looks at with ``FOR UPDATE SKIP LOCKED``, so workers
polling at once each find a different job instead of queueing behind one row. Lease times are the
database's clock on PostgreSQL (workers on many machines agree on one clock), the process's on
SQLite (one machine).

``LeaseKeeper`` is the thread that renews a process's leases and notices, for the jobs it holds,
a cancel asked through another replica (``cancel_requested``) or a lease taken over by another
worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.data.db import Database
from app.data.records import JobRecord, utcnow

log = logging.getLogger(__name__)

LIVE = ("queued", "running")


class LeaseLost(RuntimeError):
    """This process no longer holds the job: another worker took it over after its lease ran out."""


@dataclass(frozen=True)
class Claimed:
    """A job this process now holds; ``previous`` is the owner it took it from (None: unowned)."""

    job_id: str
    kind: str
    collection_id: int | None
    params: dict[str, Any]
    previous: str | None

    @property
    def taken_over(self) -> bool:
        return self.previous is not None


class Leases:
    """The lease operations of one process (``owner``) on the jobs table."""

    def __init__(self, db: Database, *, owner: str, seconds: float) -> None:
        self.db = db
        self.owner = owner
        self.seconds = seconds
        self._postgres = db.engine.dialect.name == "postgresql"

    # -- time -------------------------------------------------------------------------------
    def _now(self) -> Any:
        """Now, as the lease columns are compared: the database's clock where there are many
        machines, this process's where there is one."""
        return func.now() if self._postgres else utcnow()

    def _until(self) -> Any:
        ahead = timedelta(seconds=self.seconds)
        return func.now() + ahead if self._postgres else utcnow() + ahead

    def mine(self) -> ColumnElement[bool]:
        """The fence every write of a running job carries."""
        return JobRecord.owner == self.owner

    def _claimable(self, *, by_poll: bool, dead: str | None = None) -> ColumnElement[bool]:
        expired = and_(JobRecord.lease_until.is_not(None), JobRecord.lease_until < self._now())
        if by_poll:  # a poller takes unowned jobs and dead owners' jobs only
            return and_(JobRecord.state.in_(LIVE), or_(JobRecord.owner.is_(None), expired))
        # A start or a direct run may also take its own jobs, those of an owner known dead and
        # those of owners from before leases (no lease: the caller checked their journals).
        return and_(
            JobRecord.state.in_(LIVE),
            or_(
                JobRecord.owner == (dead or self.owner),
                JobRecord.owner.is_(None),
                JobRecord.owner == self.owner,
                JobRecord.lease_until.is_(None),
                expired,
            ),
        )

    # -- claiming ---------------------------------------------------------------------------
    def claim(self, job_id: str, *, from_owner: str | None = None) -> Claimed | None:
        """Take ``job_id`` if it is live and free (unowned, ours, its lease ran out, or held by
        ``from_owner``, an owner known dead); None when another live process holds it or it ended."""
        with self.db.transaction() as session:
            return self._take(session, job_id, by_poll=False, dead=from_owner)

    def claim_next(self, kinds: Iterable[str]) -> Claimed | None:
        """The oldest job of ``kinds`` that is queued unowned or whose owner's lease ran out."""
        kinds = tuple(kinds)
        with self.db.transaction() as session:
            job_id = session.scalar(
                select(JobRecord.id)
                .where(JobRecord.kind.in_(kinds))
                .where(self._claimable(by_poll=True))
                .order_by(JobRecord.created_at, JobRecord.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if job_id is None:
                return None
            return self._take(session, job_id, by_poll=True)

    def _take(
        self, session: Session, job_id: str, *, by_poll: bool, dead: str | None = None
    ) -> Claimed | None:
        row = session.execute(
            select(JobRecord.kind, JobRecord.collection_id, JobRecord.params, JobRecord.owner).where(
                JobRecord.id == job_id
            )
        ).first()
        if row is None:
            return None
        kind, collection_id, params, previous = row
        taken = cast(
            CursorResult[Any],
            session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id)
                .where(self._claimable(by_poll=by_poll, dead=dead))
                .values(owner=self.owner, lease_until=self._until())
                .execution_options(synchronize_session=False)
            ),
        ).rowcount
        if not taken:
            return None
        return Claimed(
            job_id=job_id,
            kind=kind,
            collection_id=collection_id,
            params=dict(params or {}),
            previous=previous if previous and previous != self.owner else None,
        )

    def own_new(self) -> dict[str, Any]:
        """Column values that make a job being created held by this process."""
        return {"owner": self.owner, "lease_until": utcnow() + timedelta(seconds=self.seconds)}

    # -- holding ----------------------------------------------------------------------------
    def renew(self, job_ids: set[str]) -> None:
        if not job_ids:
            return
        with self.db.transaction() as session:
            session.execute(
                update(JobRecord)
                .where(JobRecord.id.in_(sorted(job_ids)))
                .where(self.mine())
                .where(JobRecord.state.in_(LIVE))
                .values(lease_until=self._until())
                .execution_options(synchronize_session=False)
            )

    def look(self, job_ids: set[str]) -> tuple[set[str], set[str]]:
        """(jobs lost to another owner or gone, jobs whose cancel was asked) among ``job_ids``."""
        if not job_ids:
            return set(), set()
        with self.db.session() as session:
            rows = session.execute(
                select(JobRecord.id, JobRecord.owner, JobRecord.cancel_requested).where(
                    JobRecord.id.in_(sorted(job_ids))
                )
            ).all()
        found = {job_id: (owner, cancel) for job_id, owner, cancel in rows}
        lost = {j for j in job_ids if j not in found or found[j][0] != self.owner}
        cancelled = {j for j, (_, cancel) in found.items() if cancel}
        return lost, cancelled

    def release(self, session: Session, job_id: str) -> None:
        """End the lease of a job that ended (in the transaction that ends it)."""
        session.execute(
            update(JobRecord)
            .where(JobRecord.id == job_id)
            .where(self.mine())
            .values(lease_until=None)
            .execution_options(synchronize_session=False)
        )

    def give_up(self) -> None:
        """End the leases of every live job this process holds (a clean shutdown): another worker,
        or the next start, resumes them at once instead of waiting for the leases to run out."""
        with self.db.transaction() as session:
            session.execute(
                update(JobRecord)
                .where(self.mine())
                .where(JobRecord.state.in_(LIVE))
                .values(lease_until=self._now())
                .execution_options(synchronize_session=False)
            )

    def request_cancel(self, job_id: str) -> None:
        with self.db.transaction() as session:
            session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id)
                .values(cancel_requested=True)
                .execution_options(synchronize_session=False)
            )


class LeaseKeeper:
    """A daemon thread: every ``poll`` seconds it looks at the held jobs' rows (``on_lost``,
    ``on_cancel``), and renews their leases a few times per lease period."""

    def __init__(
        self,
        leases: Leases,
        *,
        held: Callable[[], set[str]],
        on_lost: Callable[[set[str]], None],
        on_cancel: Callable[[set[str]], None],
        poll: float,
    ) -> None:
        self.leases = leases
        self._held = held
        self._on_lost = on_lost
        self._on_cancel = on_cancel
        self._poll = min(poll, leases.seconds / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cbir-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        renew_every = self.leases.seconds / 3
        # Real time, not a count of ticks: a slow database makes ticks longer, never renewals later.
        last_renewal = time.monotonic()
        while not self._stop.wait(self._poll):
            try:
                held = self._held()
                if not held:
                    continue
                if time.monotonic() - last_renewal >= renew_every:
                    self.leases.renew(held)
                    last_renewal = time.monotonic()
                lost, cancelled = self.leases.look(held)
                if lost:
                    log.warning("lost the lease of job(s) %s to another worker", ", ".join(sorted(lost)))
                    self._on_lost(lost)
                if cancelled:
                    self._on_cancel(cancelled)
            except Exception:  # a database hiccup: try again at the next tick, the lease has slack
                log.warning("could not renew job leases", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Holdings:
    """What one job runner holds: the jobs it claimed, those it lost to another worker, those it
    took over from a dead one, the cancels asked of them; and the keeper renewing their leases
    (started with the first job held). ``on_lost`` runs for jobs another worker took over."""

    def __init__(self, leases: Leases, *, poll: float, on_lost: Callable[[set[str]], None]) -> None:
        self.leases = leases
        self._poll = poll
        self._on_lost_hook = on_lost
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._lost: set[str] = set()
        self._taken_over: set[str] = set()
        self._cancelled: set[str] = set()
        self._keeper: LeaseKeeper | None = None

    def claim(self, job_id: str) -> Claimed | None:
        """Claim ``job_id`` and hold it; None when another live process holds it or it ended."""
        return self.adopt(self.leases.claim(job_id))

    def claim_next(self, kinds: Iterable[str]) -> Claimed | None:
        return self.adopt(self.leases.claim_next(kinds))

    def adopt(self, claimed: Claimed | None) -> Claimed | None:
        if claimed is not None:
            self.hold(claimed.job_id)
            if claimed.taken_over:
                with self._lock:
                    self._taken_over.add(claimed.job_id)
        return claimed

    def hold(self, job_id: str) -> None:
        with self._lock:
            self._held.add(job_id)
            if self._keeper is None:
                self._keeper = LeaseKeeper(
                    self.leases,
                    held=self.held,
                    on_lost=self._on_lost,
                    on_cancel=self.cancelled,
                    poll=self._poll,
                )

    def let_go(self, job_id: str) -> None:
        with self._lock:
            self._held.discard(job_id)
            self._taken_over.discard(job_id)

    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def cancelled(self, job_ids: set[str]) -> None:
        with self._lock:
            self._cancelled |= job_ids

    def cancel_asked(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def lost(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._lost

    def taken_over(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._taken_over

    def _on_lost(self, job_ids: set[str]) -> None:
        with self._lock:
            self._lost |= job_ids
            self._held -= job_ids
        self._on_lost_hook(job_ids)

    def stop(self) -> None:
        """Stop renewing and give the leases up: a worker elsewhere (or the next start here)
        resumes the jobs left running."""
        with self._lock:
            keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop()
            try:
                self.leases.give_up()
            except Exception:  # the database is away: the leases run out by themselves
                log.warning("could not give up job leases", exc_info=True)
