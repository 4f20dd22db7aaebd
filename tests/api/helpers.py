"""Assertions shared by the API tests."""

from __future__ import annotations

import httpx

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
