"""A duplicates run queued by an API replica (role ``api``) is claimed and run by a worker, and its
groups are read back through the replica (two contexts on one database stand for two processes)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.context import open_context
from app.core.settings import Settings
from app.learning.job_kinds import job_runner
from app.main import create_app
from tests.redteam.test_f05_costly_compare import fill

API = "/api/v1"


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    fast = settings.model_copy(update={"job_lease_seconds": 2.0, "job_poll_seconds": 0.1})
    with TestClient(create_app(fast.model_copy(update={"role": "api"}))) as client:
        fill(client, count=6)
        yield client


@pytest.mark.timeout(120)
def test_an_api_replica_queues_a_run_and_a_worker_runs_it(api: TestClient, settings: Settings) -> None:
    accepted = api.post(f"{API}/collections/shapes/duplicates", json={"threshold": 0.5})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    time.sleep(0.3)
    assert api.get(f"{API}/jobs/{job_id}").json()["state"] == "queued"  # nothing runs it here

    ctx = open_context(settings.model_copy(update={"job_lease_seconds": 2.0, "job_poll_seconds": 0.1}))
    runner = job_runner(ctx)
    try:
        runner.start_polling()
        deadline = time.monotonic() + 60
        while (job := api.get(f"{API}/jobs/{job_id}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
    finally:
        runner.shutdown()
        ctx.close()
    assert job["state"] == "succeeded" and job["kind"] == "duplicates", job
    page = api.get(f"{API}/collections/shapes/duplicates", params={"status": "all"}).json()
    assert page["run"]["job_id"] == job_id and page["run"]["images"] == 6
    assert page["run"]["threshold"] == 0.5
