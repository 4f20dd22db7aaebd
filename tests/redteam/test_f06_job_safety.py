"""Finding 6, round 2: evaluate and whiten jobs are safe beside other replicas and other keys.

- A replica's start leaves the jobs another live replica runs alone (it fails only those of dead
  processes), and a job another process has ended is never written over by its runner.
- A cancel reaches a job wherever it runs, and a cancelled job ends ``cancelled``, never
  ``succeeded`` (whitening from stored codes included).
- Cancelling needs the scope of the key that started the job (its report and events do too).
- An evaluation whose queries' labels cannot be matched is refused (422) before it is accepted.
- ``GET /jobs?kind=`` lists one kind of job (the import page lists imports only).

The jobs are held open by ``CBIR_FAULT_DELAY_AT=cancel_check:S``: each look at a cancellation
token waits S seconds first, so the work is certainly running when the test acts, whatever the
machine's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import update

from app.catalog.collections import require_collection
from app.core import faults
from app.core.settings import Settings
from app.data.records import JobRecord
from app.main import create_app
from tests.api.helpers import assert_problem
from tests.redteam.test_f05_costly_compare import ADMIN_KEY, READ_KEY, WRITE_KEY, fill, noise_png

API = "/api/v1"
FINAL = ("succeeded", "failed", "cancelled")
SHORT = {"queries": "mnist:test", "limit": 20, "embedders": ["pixels"]}
KEYS = f"admin:{ADMIN_KEY},write:{WRITE_KEY},read:{READ_KEY}"
ADMIN = {"X-API-Key": ADMIN_KEY}
WRITE = {"X-API-Key": WRITE_KEY}


@pytest.fixture
def slow_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every look at a cancellation token waits a second first."""
    monkeypatch.setenv(faults.DELAY_ENV, "cancel_check:1.0")
    faults.reset()
    yield
    monkeypatch.delenv(faults.DELAY_ENV)
    faults.reset()


def app_client(settings: Settings, **changes: object) -> TestClient:
    """A service whose synchronous budget nothing fits in: evaluations and whitening are jobs."""
    update_ = {"sync_cost_budget_s": 1e-6, **changes}
    return TestClient(create_app(settings.model_copy(update=update_)), raise_server_exceptions=False)


def wait_for(
    client: TestClient,
    job_id: str,
    states: tuple[str, ...],
    *,
    timeout: float = 60,
    headers: dict | None = None,
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{API}/jobs/{job_id}", headers=headers).json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def start_job(client: TestClient, *, headers: dict | None = None) -> str:
    accepted = client.post(f"{API}/collections/shapes/evaluate", json=SHORT, headers=headers)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert wait_for(client, job_id, ("running", *FINAL), headers=headers)["state"] == "running"
    return str(job_id)


# -- replicas --------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_replica_starting_leaves_the_running_jobs_of_a_live_replica_alone(
    settings: Settings, slow_checks: None
) -> None:
    with app_client(settings) as first:
        fill(first)
        job_id = start_job(first)
        with app_client(settings) as second:  # its start recovers the jobs of dead processes
            assert second.get(f"{API}/jobs/{job_id}").json()["state"] == "running"
            # A cancel reaches the job from the replica that does not run it.
            cancelled = second.post(f"{API}/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert wait_for(second, job_id, FINAL, timeout=20)["state"] == "cancelled"
        first.app.state.tasks.shutdown()  # type: ignore[attr-defined]
        assert first.get(f"{API}/jobs/{job_id}").json()["state"] == "cancelled"


@pytest.mark.timeout(120)
def test_a_job_another_process_ended_is_not_written_over_by_its_runner(
    settings: Settings, slow_checks: None
) -> None:
    with app_client(settings) as client:
        fill(client)
        job_id = start_job(client)
        ctx = client.app.state.context  # type: ignore[attr-defined]
        with ctx.db.transaction() as session:  # what an older replica's start did to it
            session.execute(
                update(JobRecord).where(JobRecord.id == job_id).values(state="failed", error="interrupted")
            )
        client.app.state.tasks.shutdown(timeout=30)  # type: ignore[attr-defined]  # its work ends
        job = client.get(f"{API}/jobs/{job_id}").json()
        assert job["state"] == "failed" and job["error"] == "interrupted", job


def test_the_jobs_of_a_process_that_died_are_failed_on_start(settings: Settings) -> None:
    with app_client(settings) as client:
        fill(client)
        ctx = client.app.state.context  # type: ignore[attr-defined]
        with ctx.db.transaction() as session:  # left running by a process that is gone
            collection_id = require_collection(session, "shapes").id
            session.add(
                JobRecord(
                    id="d" * 32,
                    collection_id=collection_id,
                    kind="evaluate",
                    state="running",
                    params={},
                    owner="12345-deadbeef.journal",
                )
            )
    with app_client(settings) as client:
        job = client.get(f"{API}/jobs/{'d' * 32}").json()
        assert job["state"] == "failed" and "restart" in job["error"], job


# -- cancelling ------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_whitening_from_stored_codes_stops_when_cancelled(settings: Settings, slow_checks: None) -> None:
    with app_client(settings) as client:
        fill(client)
        accepted = client.post(f"{API}/collections/shapes/whitening", json={"dim": 8})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        assert wait_for(client, job_id, ("running", *FINAL))["state"] == "running"

        cancelled = client.post(f"{API}/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert wait_for(client, job_id, FINAL, timeout=20)["state"] == "cancelled"
        assert client.get(f"{API}/collections/shapes").json()["whitening"] is None


@pytest.mark.timeout(120)
def test_cancelling_a_job_needs_the_scope_of_the_key_that_started_it(
    settings: Settings, slow_checks: None
) -> None:
    with app_client(settings, api_keys=SecretStr(KEYS), auth="on") as client:
        fill(client, count=12, headers=ADMIN)
        job_id = start_job(client, headers=ADMIN)
        assert_problem(client.post(f"{API}/jobs/{job_id}/cancel", headers=WRITE), 403, "forbidden")
        assert wait_for(client, job_id, FINAL, timeout=0, headers=ADMIN)["state"] == "running"
        assert client.post(f"{API}/jobs/{job_id}/cancel", headers=ADMIN).status_code == 200
        assert wait_for(client, job_id, FINAL, timeout=20, headers=ADMIN)["state"] == "cancelled"

        # The page's background evaluation: the same rule.
        path = f"{API}/collections/shapes/evaluation"
        body = {"queries": "mnist:test", "limit": 20, "compare": ["pixels"]}
        assert client.post(path, json=body, headers=ADMIN).status_code == 202
        assert_problem(client.delete(path, headers=WRITE), 403, "forbidden")
        assert client.get(path, headers=ADMIN).json()["running"], "a write key stopped an admin's run"
        assert client.delete(path, headers=ADMIN).status_code == 200
        deadline = time.monotonic() + 20
        while client.get(path, headers=ADMIN).json()["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cancelled" in client.get(path, headers=ADMIN).json()["failure"]["error"]


@pytest.mark.timeout(120)
def test_a_write_key_cancels_the_jobs_a_write_key_started(settings: Settings, slow_checks: None) -> None:
    with app_client(settings, api_keys=SecretStr(KEYS), auth="on") as client:
        fill(client, count=12, headers=ADMIN)
        job_id = start_job(client, headers=WRITE)
        assert client.post(f"{API}/jobs/{job_id}/cancel", headers=WRITE).status_code == 200
        assert wait_for(client, job_id, FINAL, timeout=20, headers=WRITE)["state"] == "cancelled"


# -- checked before accepting ----------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1e-6, 5.0])
def test_evaluating_a_collection_with_unlabelled_images_is_refused_at_once(
    settings: Settings, budget: float
) -> None:
    with app_client(settings, sync_cost_budget_s=budget) as client:
        fill(client)
        unlabelled = client.post(
            f"{API}/collections/shapes/images", files={"file": ("u.png", noise_png(500), "image/png")}
        )
        assert unlabelled.status_code == 201, unlabelled.text
        problem = assert_problem(client.post(f"{API}/collections/shapes/evaluate", json=SHORT), 422)
        assert "1 image" in problem["detail"] and "'label'" in problem["detail"], problem
        assert client.get(f"{API}/jobs", params={"kind": "evaluate"}).json()["jobs"] == []


def test_evaluating_a_collection_labelled_unlike_the_queries_is_refused_at_once(settings: Settings) -> None:
    with app_client(settings) as client:
        created = client.post(f"{API}/collections", json={"name": "pets", "embedder": "tiny"})
        assert created.status_code == 201
        for seed in range(6):
            client.post(
                f"{API}/collections/pets/images",
                files={"file": ("p.png", noise_png(seed), "image/png")},
                data={"metadata": '{"label": "cat"}'},
            )
        problem = assert_problem(client.post(f"{API}/collections/pets/evaluate", json=SHORT), 422)
        assert "none of the labels of mnist:test" in problem["detail"]


# -- the jobs list ---------------------------------------------------------------------------------
def test_the_jobs_list_filters_by_kind(settings: Settings, make_png: Callable[..., bytes]) -> None:
    from tests.api.test_imports import make_zip

    with app_client(settings) as client:
        fill(client)
        evaluate = client.post(f"{API}/collections/shapes/evaluate", json=SHORT)
        assert evaluate.status_code == 202
        imported = client.post(
            f"{API}/collections/shapes/imports",
            files={"file": ("a.zip", make_zip({"1/a.png": make_png(77)}), "application/zip")},
        )
        assert imported.status_code == 202
        kinds = {job["kind"] for job in client.get(f"{API}/jobs").json()["jobs"]}
        assert kinds == {"evaluate", "import"}
        only = client.get(f"{API}/jobs", params={"kind": "import"}).json()["jobs"]
        assert [job["id"] for job in only] == [imported.json()["job_id"]]
        assert_problem(client.get(f"{API}/jobs", params={"kind": "nonsense"}), 422)
        assert 'kind: "import"' in client.get("/static/import.js").text  # the import page's list
