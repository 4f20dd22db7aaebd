"""Assertions shared by the API tests."""

from __future__ import annotations

import json

import httpx
from pydantic import SecretStr

from app.core.settings import Settings

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """An RFC 9457 problem body with this status (and code), never a traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == status
    if code is not None:
        assert body["code"] == code, body
    assert "Traceback" not in response.text
    return body


# Server-folder and manifest imports need an admin key even before any key exists (CBIR_AUTH=auto):
# the tests of those imports configure this one and send it with every request.
ADMIN_KEY = "admin-key-of-the-folder-import-tests"
ADMIN_HEADERS = {"X-API-Key": ADMIN_KEY}


def admin_keyed(settings: Settings, **update: object) -> Settings:
    """``settings`` (updated with ``update``) with ``ADMIN_KEY`` configured as an admin key."""
    return settings.model_copy(update={**update, "api_keys": SecretStr(f"admin:{ADMIN_KEY}")})


def job_report(client: httpx.Client, job: dict) -> dict[str, tuple[str, str | None]]:
    """item -> (status, code) from the job's JSON-lines report."""
    response = client.get(f"/api/v1/jobs/{job['id']}/report")
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    return {line["item"]: (line["status"], line.get("code")) for line in lines}
