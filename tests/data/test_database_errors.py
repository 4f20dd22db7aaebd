"""Database outages are 503 problems with Retry-After, never 500s or tracebacks; bugs stay 500s.

The outage is simulated through the DBAPI here (both backends); tests/data/test_postgres.py kills real
PostgreSQL connections.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from app.data.db import is_unavailable

API = "/api/v1"
PROBLEM = "application/problem+json"


@contextmanager
def failing_once(client: TestClient, error: Exception) -> Iterator[None]:
    """The next SQL statement the app runs raises ``error`` from the DBAPI."""
    engine = client.app.state.context.db.engine  # type: ignore[attr-defined]
    pending = [error]

    def hook(*_args: object) -> None:
        if pending:
            raise pending.pop()

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def dbapi(client: TestClient):  # type: ignore[no-untyped-def]
    return client.app.state.context.db.engine.dialect.loaded_dbapi  # type: ignore[attr-defined]


def test_a_transient_database_error_is_a_503_problem_and_the_next_request_succeeds(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    with failing_once(client, dbapi(client).OperationalError("database is locked")):
        response = client.get(f"{API}/collections/{collection}")
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["retry-after"] == "5"
    body = response.json()
    assert body["code"] == "database_unavailable" and body["title"] == "Database unavailable"
    assert "Traceback" not in response.text and "locked" not in response.text
    assert client.get(f"{API}/collections/{collection}").status_code == 200


def test_a_database_error_that_is_a_bug_stays_a_500(client: TestClient, collection: str):
    with failing_once(client, dbapi(client).ProgrammingError("no such column: nope")):
        response = client.get(f"{API}/collections/{collection}")
    assert response.status_code == 500, response.text
    assert response.json()["code"] == "internal_error"
    assert "nope" not in response.text


def wrapped(
    orig: Exception, kind: type[sa_exc.DBAPIError] = sa_exc.OperationalError, *, invalidated: bool = False
) -> sa_exc.DBAPIError:
    """``orig`` as SQLAlchemy raises it from a DBAPI call."""
    return kind("SELECT 1", {}, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (wrapped(sqlite3.OperationalError("database is locked")), True),
        (wrapped(sqlite3.OperationalError("no such table: images")), False),
        (wrapped(sqlite3.IntegrityError("UNIQUE constraint failed"), sa_exc.IntegrityError), False),
        (wrapped(OSError("server closed the connection unexpectedly")), True),  # PostgreSQL drivers
        (wrapped(OSError("gone"), sa_exc.InterfaceError, invalidated=True), True),
        (wrapped(OSError("duplicate key"), sa_exc.IntegrityError), False),
        (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), True),
        (sa_exc.NoResultFound("none"), False),
        (ValueError("not a database error"), False),
    ],
)
def test_is_unavailable_tells_outages_from_bugs(error: Exception, transient: bool):
    assert is_unavailable(error) is transient
