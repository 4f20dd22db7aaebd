"""Engine, sessions and migrations. Built by the app or CLI from Settings, never at import time."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from app.core.errors import CbirError, InsufficientStorage, ReadOnly

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# pg_advisory_xact_lock key held while migrating ("cbir" in ASCII).
MIGRATION_LOCK = 0x63626972


# How long a SQLite writer waits for another one (the server, `cbir import`, a bulk job) before
# "database is locked": far longer than any one batch's transaction holds the lock.
BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """The engine for ``url``; ``read_only`` opens SQLite with ``mode=ro`` and makes every
    PostgreSQL transaction read-only, so that no code path can write by mistake."""
    if url.startswith("sqlite"):
        if read_only:
            path = make_url(url).database
            url = f"sqlite:///file:{path}?mode=ro&uri=true"
        connect_args = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
        # hide_parameters: a database error's text (logged, or in a job's error) never quotes the
        # values of its statement, such as the full URLs a job row keeps.
        engine = create_engine(url, connect_args=connect_args, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_conn.cursor()
            # WAL: readers never block the single writer; foreign keys for cascades. A read-only
            # connection cannot change the journal mode (a database the service wrote is WAL).
            if not read_only:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # pre_ping: a connection the server dropped while idle in the pool is replaced, not used.
    read_only_args = {"options": "-c default_transaction_read_only=on"} if read_only else {}
    return create_engine(url, pool_pre_ping=True, connect_args=read_only_args, hide_parameters=True)


def is_unavailable(exc: BaseException) -> bool:
    """Whether a database error is transient (server unreachable, connection dropped, pool
    exhausted, a lock not granted): the request may succeed if retried, so it is a 503, not a 500.

    SQLAlchemy invalidates a dropped connection and the pool replaces it, so the next request
    gets a fresh one.
    """
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection became free in time
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if isinstance(exc.orig, sqlite3.Error):
        # SQLite also reports a missing table as an OperationalError; only a busy file is transient.
        return isinstance(exc.orig, sqlite3.OperationalError) and "locked" in str(exc.orig)
    # PostgreSQL: connection failures, administrator shutdown, deadlocks, lock and statement timeouts.
    return isinstance(exc, sa_exc.OperationalError)


# SQLite result codes (the low byte of an extended code) and PostgreSQL SQLSTATEs.
_SQLITE_READONLY, _SQLITE_FULL = 8, 13
_PG_DISK_FULL, _PG_READ_ONLY_TRANSACTION = "53100", "25006"


def storage_fault(exc: BaseException) -> CbirError | None:
    """The client's error when the database refused a write because its disk is full (507) or it
    is read-only (503); None for anything else."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return None
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", 0) & 0xFF
        full, read_only = code == _SQLITE_FULL, code == _SQLITE_READONLY
    else:
        state = getattr(orig, "sqlstate", None)
        full, read_only = state == _PG_DISK_FULL, state == _PG_READ_ONLY_TRANSACTION
    if full:
        return InsufficientStorage("the database's disk is full; nothing of this request was kept")
    if read_only:
        return ReadOnly("the database is read-only; searches still work, writes do not")
    return None


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Run ``alembic upgrade head`` on the engine's database."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas and workers starting together: one migrates, the others wait and find the
            # database at head (the lock ends with this transaction).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Database:
    """Owns the engine and the session factory for one service or CLI run."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.read_only = read_only
        self.engine = make_engine(url, read_only=read_only)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def shared(self) -> bool:
        """Whether other processes on other machines may use this database (PostgreSQL), so that
        jobs are claimed from it; SQLite keeps them with the process that queued them."""
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session

    def migrate(self) -> None:
        if not self.read_only:
            upgrade_to_head(self.engine)
            return
        # A read-only service cannot migrate: it serves only a database already at this version's
        # schema (an older one would fail later, table by table).
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(
            alembic_config(self.engine.url.render_as_string())
        ).get_current_head()
        with self.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        if current != head:
            raise RuntimeError(
                f"CBIR_READ_ONLY needs a database migrated to {head}; this one is at {current}: "
                "start the service once without CBIR_READ_ONLY to migrate it"
            )

    def dispose(self) -> None:
        self.engine.dispose()
