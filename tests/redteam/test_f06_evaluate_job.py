"""Finding 6: an evaluation of one embedder named eight times outlived its client and the server.

``POST /evaluate`` removes repeated embedders and takes at most four; work over the synchronous
cost budget runs as a job (202) whose result is read when it is done; jobs and the background
evaluation can be cancelled; a server running one exits within seconds of SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import assert_problem
from tests.api.test_imports import make_zip, start_archive_import
from tests.liveserver import LiveServer, run_in_sqlite_pass_only
from tests.redteam.test_f05_costly_compare import fill, import_digits, noise_png

API = "/api/v1"
FINAL = ("succeeded", "failed", "cancelled")
# Costly enough to still be running when the test acts: 3,000 queries through EfficientNet.
LONG = {"queries": "mnist:test", "limit": 3000, "embedders": ["efficientnet_lite0"]}
SHORT = {"queries": "mnist:test", "limit": 20, "embedders": ["pixels"]}


def client_for(settings: Settings, **changes: object) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=changes)), raise_server_exceptions=False)


@pytest.fixture
def tight(settings: Settings) -> Iterator[TestClient]:
    with client_for(settings, sync_cost_budget_s=1e-6) as client:
        fill(client)
        yield client


def wait_for(
    client: TestClient | httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 60
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{API}/jobs/{job_id}").json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_evaluate_counts_an_embedder_named_eight_times_once(client: TestClient) -> None:
    fill(client)
    body = {**SHORT, "embedders": ["pixels"] * 8}
    response = client.post(f"{API}/collections/shapes/evaluate", json=body)
    assert response.status_code == 200, response.text
    assert [row["embedder"] for row in response.json()["results"]] == ["tiny-v1", "pixels"]


def test_evaluate_with_more_than_four_distinct_embedders_is_refused(client: TestClient) -> None:
    fill(client)
    five = [
        "pixels",
        "tiny",
        "efficientnet_lite0",
        "efficientnet_lite0:pooling=max",
        "efficientnet_lite0:pooling=gem",
    ]
    problem = assert_problem(
        client.post(f"{API}/collections/shapes/evaluate", json={**SHORT, "embedders": five}), 422
    )
    assert "at most 4" in problem["detail"]


def test_evaluate_over_the_sync_budget_runs_as_a_job_with_a_result(tight: TestClient) -> None:
    accepted = tight.post(f"{API}/collections/shapes/evaluate", json=SHORT)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["status_url"] == f"{API}/jobs/{body['job_id']}"
    job = wait_for(tight, body["job_id"], FINAL)
    assert job["state"] == "succeeded" and job["kind"] == "evaluate", job
    result = tight.get(body["result_url"])
    assert result.status_code == 200, result.text
    assert result.json()["collection"] == "shapes"
    assert [row["embedder"] for row in result.json()["results"]] == ["tiny-v1", "pixels"]


def test_whitening_over_the_sync_budget_runs_as_a_job(tight: TestClient) -> None:
    accepted = tight.post(f"{API}/collections/shapes/whitening", json={"dim": 8})
    assert accepted.status_code == 202, accepted.text
    job = wait_for(tight, accepted.json()["job_id"], FINAL)
    assert job["state"] == "succeeded" and job["kind"] == "whiten", job
    assert tight.get(f"{API}/collections/shapes").json()["whitening"] == 8


def test_evaluate_over_the_job_budget_is_refused(settings: Settings) -> None:
    with client_for(settings, sync_cost_budget_s=1e-6, job_cost_budget_s=1e-6) as client:
        fill(client)
        problem = assert_problem(
            client.post(f"{API}/collections/shapes/evaluate", json=SHORT), 422, "over_budget"
        )
        assert "CBIR_JOB_COST_BUDGET_S" in problem["detail"] and "limit" in problem["detail"]


@pytest.mark.timeout(120)
def test_an_evaluate_job_can_be_cancelled(tight: TestClient) -> None:
    assert tight.post(f"{API}/collections/shapes/evaluate", json=SHORT).status_code == 202
    accepted = tight.post(f"{API}/collections/shapes/evaluate", json=LONG)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert wait_for(tight, job_id, ("running", *FINAL))["state"] == "running"
    time.sleep(1.0)  # well into the embedding

    cancelled = tight.post(f"{API}/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    started = time.monotonic()
    assert wait_for(tight, job_id, FINAL, timeout=20)["state"] == "cancelled"
    assert time.monotonic() - started < 10
    assert_problem(tight.get(accepted.json()["result_url"]), 409, "job_not_finished")
    assert_problem(tight.post(f"{API}/jobs/{job_id}/cancel"), 409, "job_finished")


@pytest.mark.timeout(120)
def test_the_background_evaluation_can_be_cancelled(client: TestClient) -> None:
    fill(client)
    path = f"{API}/collections/shapes/evaluation"
    body = {"queries": "mnist:test", "limit": 3000, "compare": ["efficientnet_lite0"]}
    assert client.post(path, json=body).status_code == 202
    time.sleep(1.0)
    stopped = client.delete(path)
    assert stopped.status_code == 200, stopped.text
    deadline = time.monotonic() + 10
    while client.get(path).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = client.get(path).json()
    assert after["running"] == [] and "cancelled" in after["failure"]["error"]


# -- a live server: SIGTERM while an evaluation runs ----------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_server_running_an_evaluation_exits_within_seconds_of_sigterm(tmp_path: Path) -> None:
    run_in_sqlite_pass_only()
    env = {
        "CBIR_IMPORT_PROCESSES": "0",
        "CBIR_DEFAULT_EMBEDDER": "tiny",
        "CBIR_SYNC_COST_BUDGET_S": "0.000001",
    }
    server = LiveServer(tmp_path / "data", tmp_path / "server.log", env=env).start()
    try:
        import_digits(server, 50)
        try:  # an old server answers when it is done; this client gives up before
            accepted = httpx.post(f"{server.url}{API}/collections/digits/evaluate", json=LONG, timeout=30)
        except httpx.TimeoutException:
            accepted = None
        if accepted is not None:
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job_id"]
            with httpx.Client(base_url=server.url) as http:
                assert wait_for(http, job_id, ("running", *FINAL))["state"] == "running"
        time.sleep(3.0)  # EfficientNet loaded and embedding queries

        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            server.process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still ran 8 s after SIGTERM:\n{server.tail()}")
        print(f"exited {time.monotonic() - started:.1f} s after SIGTERM")
        assert time.monotonic() - started < 8

        # The job cannot resume: after a restart it says so instead of staying "running".
        server = LiveServer(server.data_dir, server.log, env=env).start()
        assert accepted is not None
        job = server.api("GET", f"/jobs/{job_id}").json()
        assert job["state"] == "failed" and "restart" in job["error"], job
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_an_evaluate_result_of_an_unknown_or_foreign_job_is_a_404(tight: TestClient) -> None:
    """The result route's bad input: no such job, a job of another collection or of another kind."""
    assert_problem(tight.get(f"{API}/collections/shapes/evaluate/no-such-job"), 404, "job_not_found")
    accepted = tight.post(f"{API}/collections/shapes/evaluate", json=SHORT)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert wait_for(tight, job_id, FINAL)["state"] == "succeeded"
    assert tight.get(accepted.json()["result_url"]).status_code == 200
    assert tight.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"}).status_code == 201
    assert_problem(tight.get(f"{API}/collections/other/evaluate/{job_id}"), 404, "job_not_found")
    started = start_archive_import(tight, "shapes", make_zip({"a/x.png": noise_png(99)}))
    assert started.status_code == 202, started.text
    import_id = started.json()["job_id"]  # a job of another kind is not an evaluation
    assert_problem(tight.get(f"{API}/collections/shapes/evaluate/{import_id}"), 404, "job_not_found")
