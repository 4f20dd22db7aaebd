"""PostgreSQL for the tests: find a server, and give every test a schema of its own.

Tests share one server and one database, so each test gets a fresh schema, selected for all of
its connections by ``search_path`` in the URL (``options=-csearch_path=...``), and dropped at
teardown. Creating a schema is instant, unlike a database, and nothing can leak between tests.

``python -m tests.postgres probe URL`` prints the URL without its password and exits 0 when the
server answers within two seconds (the Makefile asks before running the suite again on PostgreSQL).
"""

from __future__ import annotations

import sys
import uuid

from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def redact(url: str) -> str:
    """The URL without its password, for banners and messages."""
    return make_url(url).render_as_string(hide_password=True)


def probe(url: str, *, timeout: int = 2) -> str | None:
    """None when a PostgreSQL server answers at ``url``, else why not."""
    try:
        engine = create_engine(url, connect_args={"connect_timeout": timeout})
    except ImportError as exc:  # no driver: `pip install -e '.[dev]'` brings psycopg
        return str(exc)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    finally:
        engine.dispose()
    return None


def admin_engine(url: str) -> Engine:
    """Autocommit connections for creating and dropping the tests' schemas."""
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1)


def new_schema(admin: Engine) -> str:
    name = f"test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{name}"'))
    return name


def schema_url(url: str, schema: str) -> str:
    """``url`` with every connection in ``schema`` and tagged with it (``application_name``),
    so a test can find, and terminate, the connections of the app it runs."""
    query = {"options": f"-csearch_path={schema}", "application_name": schema}
    return make_url(url).update_query_dict(query).render_as_string(hide_password=False)


def terminate(admin: Engine, schema: str) -> int:
    """Kill every connection opened through ``schema_url(..., schema)``; returns how many."""
    with admin.connect() as connection:
        return len(
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()"
                ),
                {"name": schema},
            ).all()
        )


def drop_schema(admin: Engine, schema: str) -> None:
    terminate(admin, schema)  # a connection a test left open would hold locks and block the drop
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "probe":
        print("usage: python -m tests.postgres probe URL", file=sys.stderr)
        return 2
    url = argv[2]
    if not is_postgres(url):
        print(f"not a PostgreSQL URL: {redact(url)}", file=sys.stderr)
        return 2
    reason = probe(url)
    if reason is not None:
        print(f"PostgreSQL is not reachable at {redact(url)}: {reason}", file=sys.stderr)
        return 1
    print(redact(url))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
