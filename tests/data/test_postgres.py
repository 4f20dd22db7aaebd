"""PostgreSQL-only behaviour: concurrent writers and connections the server drops.

These run on the PostgreSQL pass of ``make test`` (CBIR_TEST_DATABASE_URL) and are skipped on SQLite.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, event, func, insert, select, text

from app.data.records import CollectionRecord, ImageRecord
from tests import postgres
from tests.api.test_imports import make_zip, start_archive_import, wait_for_job

pytestmark = pytest.mark.pg

API = "/api/v1"
PROBLEM = "application/problem+json"


def app_engine(client: TestClient) -> Engine:
    return client.app.state.context.db.engine  # type: ignore[attr-defined,no-any-return]


@contextmanager
def before_first(engine: Engine, prefix: str, action: Callable[[Any], None]) -> Iterator[list[str]]:
    """Run ``action(dbapi_cursor)`` once, just before the first statement starting with ``prefix``
    (e.g. in the middle of a request); yields the statements it fired on."""
    fired: list[str] = []
    lock = threading.Lock()

    def hook(_conn, cursor, statement, _params, _context, _many) -> None:  # type: ignore[no-untyped-def]
        with lock:
            if fired or not statement.lstrip().upper().startswith(prefix):
                return
            fired.append(statement)
        action(cursor)

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(engine, "before_cursor_execute", hook)


@pytest.fixture
def other_writer(database_url: str) -> Iterator[Engine]:
    """A second writer on the test's schema: another process, as far as the app can tell."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def image_rows(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return dict(connection.execute(select(ImageRecord.sha256, ImageRecord.id)).all())


def upload(client: TestClient, data: bytes, name: str = "a.png") -> httpx.Response:
    return client.post(f"{API}/collections/shapes/images", files={"file": (name, data, "image/png")})


def test_tests_run_on_postgresql(client: TestClient, pg_schema: str):
    engine = app_engine(client)
    assert engine.dialect.name == "postgresql"
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT current_schema()")) == pg_schema


def race_uploads_and_imports(
    client: TestClient, collection: str, images: list[bytes], archives: list[bytes], *, timeout: float = 120
) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Upload every image and start every archive import at the same moment (a barrier), each on
    its own thread; the responses in the order given."""
    start = threading.Barrier(len(images) + len(archives))

    def send_upload(index: int) -> httpx.Response:
        start.wait()
        return upload(client, images[index], f"{index}.png")

    def send_import(data: bytes) -> httpx.Response:
        start.wait()
        return start_archive_import(client, collection, data)

    with ThreadPoolExecutor(max_workers=start.parties) as pool:
        uploads = [pool.submit(send_upload, index) for index in range(len(images))]
        imports = [pool.submit(send_import, data) for data in archives]
        return [f.result(timeout=timeout) for f in uploads], [f.result(timeout=timeout) for f in imports]


def test_eight_concurrent_uploads_and_two_imports_store_each_distinct_image_once(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    upload_seeds = [0, 1, 2, 3, 0, 1, 2, 3]  # each image twice, at the same moment
    archives = [
        make_zip({f"a/{seed}.png": make_png(seed) for seed in range(2, 10)}),
        make_zip({f"b/{seed}.png": make_png(seed) for seed in range(6, 14)}),
    ]
    distinct = set(range(14))
    upload_responses, import_responses = race_uploads_and_imports(
        client, collection, [make_png(seed) for seed in upload_seeds], archives
    )

    for response in upload_responses:
        assert response.status_code in (200, 201), response.text
    for response in import_responses:
        assert response.status_code == 202, response.text
    jobs = [wait_for_job(client, r.json()["job_id"]) for r in import_responses]
    for job in jobs:
        assert job["state"] == "succeeded", job
        assert job["failed"] == 0 and job["added"] + job["duplicates"] == 8, job

    # Both uploads of one image got the same id; exactly one of them created it.
    ids: dict[int, set[int]] = {}
    for seed, response in zip(upload_seeds, upload_responses, strict=True):
        ids.setdefault(seed, set()).add(response.json()["id"])
    assert all(len(found) == 1 for found in ids.values()), ids
    created = sum(r.json()["created"] for r in upload_responses)
    assert created + sum(job["added"] for job in jobs) == len(distinct)

    rows = image_rows(app_engine(client))
    assert len(rows) == len(distinct)
    assert set(rows) == {hashlib.sha256(make_png(seed)).hexdigest() for seed in distinct}
    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["index_size"] == len(distinct)


def _store_behind_the_apps_back(other_writer: Engine, data: bytes) -> Callable[[Any], None]:
    """An action for ``before_first``: another writer commits a row for the same bytes."""

    def action(_cursor: Any) -> None:
        with other_writer.begin() as connection:
            collection_id = connection.scalar(
                select(CollectionRecord.id).where(CollectionRecord.name == "shapes")
            )
            connection.execute(
                insert(ImageRecord).values(
                    collection_id=collection_id,
                    sha256=hashlib.sha256(data).hexdigest(),
                    byte_size=len(data),
                    format="PNG",
                    width=28,
                    height=28,
                    meta={},
                    created_at=func.now(),
                )
            )

    return action


def test_bytes_another_writer_stores_mid_upload_are_answered_as_the_existing_image(
    client: TestClient, collection: str, make_png: Callable[..., bytes], other_writer: Engine
):
    data = make_png(7)
    action = _store_behind_the_apps_back(other_writer, data)
    with before_first(app_engine(client), "INSERT INTO IMAGES", action) as fired:
        response = upload(client, data)
    assert fired, "the upload never inserted a row"
    assert response.status_code == 200, response.text  # the unique key refused ours: a duplicate
    body = response.json()
    assert body["created"] is False
    assert image_rows(app_engine(client)) == {hashlib.sha256(data).hexdigest(): body["id"]}


def test_bytes_another_writer_stores_mid_import_are_counted_as_duplicates(
    client: TestClient, collection: str, make_png: Callable[..., bytes], other_writer: Engine
):
    archive = make_zip({f"x/{seed}.png": make_png(seed) for seed in range(5)})
    action = _store_behind_the_apps_back(other_writer, make_png(3))
    with before_first(app_engine(client), "INSERT INTO IMAGES", action) as fired:
        job = wait_for_job(client, start_archive_import(client, collection, archive).json()["job_id"])
    assert fired
    assert job["state"] == "succeeded", job
    assert (job["added"], job["duplicates"], job["failed"]) == (4, 1, 0)
    assert len(image_rows(app_engine(client))) == 5


def _kill_own_connection(pg_admin: Engine) -> Callable[[Any], None]:
    """An action for ``before_first``: the server terminates the connection about to be used."""

    def action(cursor: Any) -> None:
        with pg_admin.connect() as connection:
            pid = cursor.connection.info.backend_pid
            assert connection.scalar(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})

    return action


def test_a_connection_killed_mid_request_is_a_503_and_the_pool_recovers(
    client: TestClient, collection: str, make_png: Callable[..., bytes], pg_admin: Engine
):
    image_id = upload(client, make_png(1)).json()["id"]
    with before_first(app_engine(client), "SELECT", _kill_own_connection(pg_admin)) as fired:
        response = client.get(f"{API}/images/{image_id}")
    assert fired
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM
    assert int(response.headers["retry-after"]) > 0
    body = response.json()
    assert body["code"] == "database_unavailable" and body["status"] == 503
    assert "Traceback" not in response.text and "psycopg" not in response.text

    # The next requests get fresh connections, reads and writes alike.
    assert client.get(f"{API}/images/{image_id}").status_code == 200
    assert upload(client, make_png(2)).status_code == 201
    assert client.get(f"{API}/health").status_code == 200


def test_a_connection_killed_mid_upload_writes_nothing_and_the_retry_stores_the_image(
    client: TestClient, collection: str, make_png: Callable[..., bytes], pg_admin: Engine
):
    data = make_png(3)
    with before_first(app_engine(client), "INSERT INTO IMAGES", _kill_own_connection(pg_admin)) as fired:
        response = upload(client, data)
    assert fired
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert image_rows(app_engine(client)) == {}  # the transaction died with its connection

    retry = upload(client, data)
    assert retry.status_code == 201, retry.text
    assert image_rows(app_engine(client)) == {hashlib.sha256(data).hexdigest(): retry.json()["id"]}
    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["index_size"] == 1


def test_connections_killed_between_requests_are_replaced_without_an_error(
    client: TestClient, collection: str, make_png: Callable[..., bytes], pg_admin: Engine, pg_schema: str
):
    image_id = upload(client, make_png(1)).json()["id"]
    assert postgres.terminate(pg_admin, pg_schema) >= 1  # every idle connection in the app's pool
    # pool_pre_ping notices the dead connections at checkout: no request sees an error.
    assert client.get(f"{API}/images/{image_id}").status_code == 200
    assert upload(client, make_png(2)).status_code == 201
