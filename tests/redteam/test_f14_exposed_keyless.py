"""Finding 14: `docker compose up` published a keyless service on every interface, so anyone who
could reach the host could delete collections, import URLs or change index settings.

Now, with CBIR_AUTH=auto and no key, a service reachable from other machines (CBIR_HOST not a
loopback address, or a request that arrived on a non-loopback address) refuses write and admin
routes with 403 ``auth_required``, saying how to create a key; reads and pages keep working.
``make run`` (127.0.0.1) stays keyless; CBIR_AUTH=off lifts the refusal; once a key exists the
usual key checks apply. ``cbir serve`` with CBIR_CREATE_ADMIN_KEY (as docker-compose.yml sets it)
creates an admin key on a first start without any and prints it once.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from app.access.keys import Scope, create_key, digest
from app.cli import main
from app.core.settings import Settings, get_settings
from app.data.db import Database
from app.data.records import ApiKeyRecord
from app.main import create_app
from tests.api.helpers import assert_problem
from tests.liveserver import ROOT, run_in_sqlite_pass_only, server_env

API = "/api/v1"
ELSEWHERE = "http://192.0.2.10:8000"  # the service as reached on a non-loopback address (TEST-NET-1)
LOOPBACK = "http://127.0.0.1:8000"
SECRET = re.compile(r"cbir_[A-Za-z0-9_-]{20,}")


def writes(client: TestClient, base: str, png: bytes) -> list[Any]:
    """A write and three admin operations, the finding's list."""
    return [
        client.post(f"{base}{API}/collections/shapes/images", files={"file": ("a.png", png)}),
        client.post(f"{base}{API}/collections/shapes/imports", json={"urls": ["https://example.com/a.png"]}),
        client.put(f"{base}{API}/collections/shapes/index", json={"factory": "IDMap2,Flat"}),
        client.delete(f"{base}{API}/collections/shapes"),
    ]


def assert_refused(response: httpx.Response) -> None:
    body = assert_problem(response, 403, "auth_required")
    assert "cbir keys create --scope admin" in body["detail"] and "CBIR_API_KEYS" in body["detail"]
    assert "CBIR_AUTH=off" in body["detail"]


def assert_reads_work(client: TestClient, base: str, png: bytes) -> None:
    assert client.get(f"{base}{API}/collections").status_code == 200
    assert client.get(f"{base}{API}/collections/shapes/images").status_code == 200
    search = client.post(f"{base}{API}/collections/shapes/search", files={"file": ("q.png", png)})
    assert search.status_code == 200, search.text
    assert client.get(f"{base}/").status_code == 200
    assert client.get(f"{base}{API}/health").status_code == 200


@pytest.fixture
def service(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """``service(**settings)`` -> a started TestClient whose collection "shapes" holds one image
    (created from a loopback address, as `make run` lets one)."""
    clients: list[TestClient] = []

    def start(**changes: object) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=changes)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def seed(client: TestClient, png: bytes, **headers: str) -> None:
    created = client.post(
        f"{LOOPBACK}{API}/collections", json={"name": "shapes", "embedder": "tiny"}, headers=headers
    )
    assert created.status_code == 201, created.text
    stored = client.post(
        f"{LOOPBACK}{API}/collections/shapes/images", files={"file": ("s.png", png)}, headers=headers
    )
    assert stored.status_code == 201, stored.text


# -- in process: the request's server address, and CBIR_HOST --------------------------------------
def test_keyless_request_on_a_non_loopback_address_cannot_write(service, make_png):
    client = service()
    seed(client, make_png(1))  # from 127.0.0.1: keyless, as make run has always been
    for response in writes(client, ELSEWHERE, make_png(2)):
        assert_refused(response)
    assert_reads_work(client, ELSEWHERE, make_png(1))
    assert client.get(f"{LOOPBACK}{API}/collections/shapes").json()["image_count"] == 1


def test_keyless_service_listening_on_all_interfaces_cannot_write(service, make_png):
    client = service(host="0.0.0.0")
    # Even a loopback request: behind Docker's port publishing every request looks local or not
    # depending on the network, and the operator asked to be reachable from everywhere.
    created = client.post(f"{LOOPBACK}{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    assert_refused(created)
    detail = created.json()["detail"]
    assert "CBIR_HOST=0.0.0.0" in detail
    assert client.get(f"{LOOPBACK}{API}/collections").status_code == 200


def test_make_run_on_loopback_stays_keyless(service, make_png):
    client = service(host="127.0.0.1")
    seed(client, make_png(1))
    assert client.delete(f"{LOOPBACK}{API}/collections/shapes").status_code == 204


def test_cbir_auth_off_serves_keyless_writes_on_purpose(service, make_png):
    client = service(host="0.0.0.0", auth="off")
    seed(client, make_png(1))
    statuses = [r.status_code for r in writes(client, ELSEWHERE, make_png(2))]
    assert statuses[0] == 201 and statuses[-1] == 204, statuses


def test_once_a_key_exists_writes_need_it(service, settings: Settings, make_png):
    admin = "admin:" + "k" * 32
    client = service(host="0.0.0.0", api_keys=SecretStr(admin))
    key = {"X-API-Key": "k" * 32}
    seed(client, make_png(1), **key)
    no_key = client.post(
        f"{ELSEWHERE}{API}/collections/shapes/images", files={"file": ("a.png", make_png(2))}
    )
    assert_problem(no_key, 401, "unauthorized")
    keyed = client.post(
        f"{ELSEWHERE}{API}/collections/shapes/images", files={"file": ("a.png", make_png(2))}, headers=key
    )
    assert keyed.status_code == 201, keyed.text


def test_a_key_created_later_lifts_the_refusal_for_its_holder(service, settings: Settings, make_png):
    client = service()
    seed(client, make_png(1))
    assert_refused(client.delete(f"{ELSEWHERE}{API}/collections/shapes"))
    db = Database(settings.sqlalchemy_url)
    try:
        _, secret = create_key(db, name="ops", scope=Scope.admin)
    finally:
        db.dispose()
    client.app.state.guard.keys.invalidate()  # as the next refresh (every 2 s) would
    assert_problem(client.delete(f"{ELSEWHERE}{API}/collections/shapes"), 401, "unauthorized")
    deleted = client.delete(f"{ELSEWHERE}{API}/collections/shapes", headers={"X-API-Key": secret})
    assert deleted.status_code == 204, deleted.text


def test_each_service_logs_its_refusal_once(service, make_png, caplog: pytest.LogCaptureFixture):
    # The "logged already" mark belongs to each service, not to the process: a second app in the
    # same process (tests, an embedding host) still tells its operator.
    for _ in range(2):
        client = service(host="0.0.0.0")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="app.api.exposure"):
            for _ in range(3):
                assert_refused(
                    client.post(f"{LOOPBACK}{API}/collections", json={"name": "x", "embedder": "tiny"})
                )
        logged = [r for r in caplog.records if r.getMessage().startswith("refusing writes")]
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]
        assert "CBIR_HOST=0.0.0.0" in logged[0].getMessage()


# -- cbir serve with CBIR_CREATE_ADMIN_KEY (the compose file's first start) -----------------------
@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    """The CLI on this test's data folder; ``uvicorn.run`` only records what it was given."""
    import uvicorn

    monkeypatch.setenv("CBIR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CBIR_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CBIR_DEFAULT_EMBEDDER", "tiny")
    monkeypatch.setenv("CBIR_HOST", "0.0.0.0")
    runs: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: runs.append(kwargs))
    get_settings.cache_clear()
    yield runs
    get_settings.cache_clear()


def stored_keys(settings: Settings) -> list[ApiKeyRecord]:
    settings.ensure_dirs()
    db = Database(settings.sqlalchemy_url)
    try:
        db.migrate()
        with db.session() as session:
            return list(session.scalars(select(ApiKeyRecord)))
    finally:
        db.dispose()


def test_first_start_creates_an_admin_key_and_prints_it_once(cli_env, settings, monkeypatch):
    monkeypatch.setenv("CBIR_CREATE_ADMIN_KEY", "true")
    first = CliRunner().invoke(main, ["serve"])
    assert first.exit_code == 0, first.output
    assert len(cli_env) == 1 and cli_env[0]["host"] == "0.0.0.0"
    (secret,) = SECRET.findall(first.stdout)
    (record,) = stored_keys(settings)
    assert record.scope == "admin" and record.sha256 == digest(secret)
    assert secret not in (record.prefix, record.sha256)  # only the hash and a prefix are kept
    second = CliRunner().invoke(main, ["serve"])
    assert second.exit_code == 0 and not SECRET.findall(second.output)
    assert len(stored_keys(settings)) == 1


def test_first_start_creates_nothing_when_keys_are_configured(cli_env, settings, monkeypatch):
    monkeypatch.setenv("CBIR_CREATE_ADMIN_KEY", "true")
    monkeypatch.setenv("CBIR_API_KEYS", "admin:" + "c" * 32)
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 0 and not SECRET.findall(result.output)
    assert stored_keys(settings) == []


def test_without_the_setting_serve_creates_no_key(cli_env, settings):
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 0 and stored_keys(settings) == []


def test_serve_on_port_zero_lets_the_system_pick_a_free_port(cli_env):
    assert CliRunner().invoke(main, ["serve", "--port", "0"]).exit_code == 0
    assert CliRunner().invoke(main, ["serve"]).exit_code == 0
    assert [run["port"] for run in cli_env] == [0, 8000]


# -- real servers ----------------------------------------------------------------------------------
def cbir_serve(data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """`cbir serve` as the compose file runs it: on every interface, CBIR_CREATE_ADMIN_KEY on; on a
    port the system picks as it binds (``--port 0``), so no other process can take it first."""
    env = server_env(
        data_dir,
        CBIR_HOST="0.0.0.0",
        CBIR_CREATE_ADMIN_KEY="true",
        CBIR_DEFAULT_EMBEDDER="tiny",
        CBIR_IMPORT_PROCESSES="0",
    )
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", "0"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


RUNNING = re.compile(r"Uvicorn running on http://0\.0\.0\.0:(\d+)")


def loopback_url(process: subprocess.Popen[bytes], log: Path, *, since: int) -> str:
    """The server's address on 127.0.0.1, from the port uvicorn logs once it is bound (in the log
    after byte ``since``: each start appends to the same log)."""
    deadline = time.monotonic() + 120
    while True:
        found = RUNNING.search(log.read_bytes()[since:].decode(errors="replace"))
        if found:
            return f"http://127.0.0.1:{found.group(1)}"
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"{url}{API}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_compose_first_start_prints_an_admin_key_that_opens_writes(tmp_path: Path, make_png):
    run_in_sqlite_pass_only()
    log = tmp_path / "serve.log"
    secrets_seen: list[str] = []
    for start in range(2):
        since = log.stat().st_size if log.exists() else 0
        process = cbir_serve(tmp_path / "data", log)
        try:
            url = loopback_url(process, log, since=since)
            wait_healthy(url, process, log)
            secrets_seen = SECRET.findall(log.read_text(errors="replace"))
            assert len(secrets_seen) == 1, (start, log.read_text()[-2000:])  # printed on the first start only
            key = {"X-API-Key": secrets_seen[0]}
            with httpx.Client(base_url=url, trust_env=False, timeout=60) as http:
                name = f"c{start}"
                refused = http.post(f"{API}/collections", json={"name": name, "embedder": "tiny"})
                assert_problem(refused, 401, "unauthorized")
                created = http.post(
                    f"{API}/collections", json={"name": name, "embedder": "tiny"}, headers=key
                )
                assert created.status_code == 201, created.text
        finally:
            process.terminate()
            process.wait(timeout=30)
