"""Finding 8: secrets in imported URLs (user-info, signed query strings) never leave the service.

A URL import holding ``user:password@`` and signed query strings, run with a write key under
``CBIR_AUTH=on``; then the job list, the job, its report, its events, the stored images and the log
are read with and without a key. Nothing shows a secret; the report and the events need the scope
of the key that started the job. The fixture server of section E (tests/reliability/test_e_urls.py)
answers on loopback through the test-only host rule.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import assert_problem
from tests.reliability.test_e_urls import FIXTURE, Server, png_bytes, send

API = "/api/v1"
WRITE_KEY = "write-key-of-the-url-secret-tests"
READ_KEY = "read-key-of-the-url-secret-tests"
SECRETS = ("password", "SIGNATURE", "CREDENTIAL", "TOKEN", "FRAGMENT", "LOCATIONSIG")


def routes(handler: BaseHTTPRequestHandler, server: Server) -> None:
    path = handler.path.split("?")[0]
    if path == "/a.jpg":
        send(handler, 200, png_bytes(3), {"Content-Type": "image/png"})
    elif path == "/gone.jpg":
        send(handler, 404, b"no", {"Content-Type": "text/plain"})
    elif path == "/bounce":  # to a blocked address, with a signed query of its own
        send(handler, 302, b"", {"Location": "http://127.0.0.1:9/x.jpg?sig=LOCATIONSIG"})
    else:
        send(handler, 200, b"<html></html>", {"Content-Type": "text/html"})


URLS = [
    "https://user:password@fixture.test/a.jpg?X-Amz-Signature=SIGNATURE",  # refused: credentials
    f"{FIXTURE}/a.jpg?X-Amz-Signature=SIGNATURE&X-Amz-Credential=CREDENTIAL#FRAGMENT",  # added
    f"{FIXTURE}/gone.jpg?token=TOKEN",  # 404: its detail names the URL
    f"{FIXTURE}/page?token=TOKEN",  # not an image: its detail names the URL
    f"{FIXTURE}/bounce?token=TOKEN",  # a redirect to a blocked address: its detail names the Location
    "http://user:password@fixture.test:port/x.jpg",  # malformed port after credentials
    " https://user:password@fixture.test/b.jpg?sig=SIGNATURE",  # leading blank before the scheme
    "\thttps://user:password@fixture.test/c.jpg",  # leading tab
    "https://user:pass/password@fixture.test/d.jpg",  # a "/" inside the password
    f"{FIXTURE}/e.jpg;jsessionid=TOKEN",  # a session id as a path parameter
]


@pytest.fixture
def fixture_server() -> Iterator[Server]:
    with Server(routes) as server:
        yield server


@pytest.fixture
def api(settings: Settings, fixture_server: Server) -> Iterator[TestClient]:
    keyed = Settings.model_validate(
        {
            **settings.model_dump(),
            "auth": "on",
            "url_ports": [80, 443, fixture_server.port],
            "url_allow_test_hosts": {"fixture.test": f"127.0.0.1:{fixture_server.port}"},
            "url_deadline_s": 5.0,
        }
    ).model_copy(update={"api_keys": SecretStr(f"write:{WRITE_KEY},read:{READ_KEY}")})
    with TestClient(create_app(keyed), raise_server_exceptions=False) as client:
        response = client.post(
            f"{API}/collections",
            json={"name": "shapes", "embedder": "tiny"},
            headers={"X-API-Key": WRITE_KEY},
        )
        assert response.status_code == 201, response.text
        yield client


def run_url_import(client: TestClient) -> dict:
    response = client.post(
        f"{API}/collections/shapes/imports", json={"urls": URLS}, headers={"X-API-Key": WRITE_KEY}
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 60
    while (job := client.get(f"{API}/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["state"] == "succeeded", job
    return job


def assert_no_secret(text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{leaked} in {text[:2000]}"


@pytest.mark.timeout(60)
def test_url_import_secrets_are_redacted_in_jobs_reports_events_images_and_logs(
    api: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job = run_url_import(api)
    assert (job["added"], job["failed"]) == (1, len(URLS) - 1), job
    writer = {"X-API-Key": WRITE_KEY}

    # Anyone (no key) may list the jobs: no password, no query string, no fragment.
    for response in (api.get(f"{API}/jobs"), api.get(f"{API}/jobs/{job['id']}")):
        assert response.status_code == 200, response.text
        assert_no_secret(response.text)
    shown = api.get(f"{API}/jobs/{job['id']}").json()["params"]["urls"]
    assert shown[:2] == ["https://fixture.test/a.jpg?…", f"{FIXTURE}/a.jpg?…"]

    # The creator's scope (write) may read the report and the events, which name every URL redacted.
    report = api.get(f"{API}/jobs/{job['id']}/report", headers=writer)
    assert report.status_code == 200, report.text
    assert_no_secret(report.text)
    lines = [json.loads(line) for line in report.text.splitlines()]
    assert len(lines) == len(URLS)
    assert [line["item"] for line in lines[:3]] == [
        "https://fixture.test/a.jpg?…",
        f"{FIXTURE}/a.jpg?…",
        f"{FIXTURE}/gone.jpg?…",
    ]
    assert {line["code"] for line in lines} >= {
        "invalid_url",
        "remote_error",
        "not_an_image",
        "redirect_blocked",
    }
    events = api.get(f"{API}/jobs/{job['id']}/events", headers=writer)
    assert events.status_code == 200 and "event: end" in events.text
    assert_no_secret(events.text)

    # The stored image keeps its source without the signature.
    images = api.get(f"{API}/collections/shapes/images").json()
    assert [(i["original_name"], i["metadata"].get("url")) for i in images] == [
        (f"{FIXTURE}/a.jpg?…", f"{FIXTURE}/a.jpg?…")
    ]
    assert_no_secret(json.dumps(images))
    assert_no_secret("\n".join(record.getMessage() for record in caplog.records))


@pytest.mark.timeout(60)
def test_report_and_events_need_the_scope_of_the_key_that_started_the_job(api: TestClient) -> None:
    job = run_url_import(api)
    for suffix in ("report", "events"):
        assert_problem(api.get(f"{API}/jobs/{job['id']}/{suffix}"), 401, "unauthorized")
        reader = api.get(f"{API}/jobs/{job['id']}/{suffix}", headers={"X-API-Key": READ_KEY})
        assert_problem(reader, 403, "forbidden")
        assert (
            api.get(f"{API}/jobs/{job['id']}/{suffix}", headers={"X-API-Key": WRITE_KEY}).status_code == 200
        )
    # Below the creator's scope the job shows its counters, not its per-item errors.
    anonymous = api.get(f"{API}/jobs/{job['id']}").json()
    assert (anonymous["failed"], anonymous["errors"]) == (len(URLS) - 1, [])
    assert (
        len(api.get(f"{API}/jobs/{job['id']}", headers={"X-API-Key": WRITE_KEY}).json()["errors"])
        == len(URLS) - 1
    )
