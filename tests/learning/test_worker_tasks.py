"""Whitening and evaluation jobs beside API replicas and workers (app/learning/tasks.py and the
kinds in app/learning/job_kinds.py): an API replica (role ``api``) queues them unowned, a worker's
job runner claims and runs them, every replica reads their result, a cancel reaches them through
the row; in role ``all`` the replica runs them itself under a lease, and a start leaves alone the
jobs whose holder's lease runs. Two contexts on one database and one data folder stand for two
processes (as tests/ingest/test_leases.py). Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from app.catalog.collections import require_collection
from app.context import AppContext, open_context
from app.core import faults
from app.core.settings import Settings
from app.data.records import JobRecord, utcnow
from app.embedding import cost
from app.ingest.jobs import JobRunner
from app.learning.evaluate_plan import EvaluationPlan
from app.learning.job_kinds import evaluation_inputs, evaluation_plan, job_runner
from app.learning.tasks import INTERRUPTED, TaskRunner, inputs_path, result_path
from app.main import create_app
from tests.redteam.test_f05_costly_compare import fill

API = "/api/v1"
FINAL = ("succeeded", "failed", "cancelled")
SHORT = {"queries": "mnist:test", "limit": 20, "embedders": ["pixels"]}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Short leases and quick looks; nothing fits the synchronous budget: every evaluation and
    whitening is a job."""
    return settings.model_copy(
        update={"job_lease_seconds": 2.0, "job_poll_seconds": 0.1, "sync_cost_budget_s": 1e-6}
    )


@pytest.fixture
def slow_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every look at a cancellation token waits a second first: the work is surely running."""
    monkeypatch.setenv(faults.DELAY_ENV, "cancel_check:1.0")
    faults.reset()
    yield
    monkeypatch.delenv(faults.DELAY_ENV)
    faults.reset()


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    """An API replica with a filled collection "shapes": it runs no jobs."""
    app = create_app(settings.model_copy(update={"role": "api"}))
    with TestClient(app, raise_server_exceptions=False) as client:
        fill(client)
        yield client


@pytest.fixture
def worker(settings: Settings) -> Iterator[tuple[AppContext, JobRunner]]:
    """A worker's state and job runner (``cbir worker``), not yet polling."""
    ctx = open_context(settings)
    runner = job_runner(ctx)
    try:
        yield ctx, runner
    finally:
        runner.shutdown()
        ctx.close()


def row(ctx: AppContext, job_id: str) -> JobRecord:
    with ctx.db.session() as session:
        record = session.get(JobRecord, job_id)
        assert record is not None
        return record


def wait_for(client: TestClient, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{API}/jobs/{job_id}").json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def wait_until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def context_of(client: TestClient) -> AppContext:
    return client.app.state.context  # type: ignore[attr-defined,no-any-return]


def add_job(ctx: AppContext, job_id: str, **values: object) -> None:
    """A whitening job row as another process left it."""
    with ctx.db.transaction() as session:
        collection_id = require_collection(session, "shapes").id
        values = {"params": {"dim": 8, "shrinkage": 0.0}, **values}
        session.add(JobRecord(id=job_id, collection_id=collection_id, kind="whiten", **values))


# -- queued by an API replica, run by a worker -----------------------------------------------------
@pytest.mark.timeout(180)
def test_an_api_replica_queues_a_whitening_and_a_worker_runs_it(
    api: TestClient, worker: tuple[AppContext, JobRunner]
) -> None:
    accepted = api.post(f"{API}/collections/shapes/whitening", json={"dim": 8})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    time.sleep(0.5)  # nothing runs it on the API replica
    queued = row(context_of(api), job_id)
    assert (queued.state, queued.owner, queued.lease_until) == ("queued", None, None)

    ctx, runner = worker
    runner.start_polling()
    job = wait_for(api, job_id, FINAL)
    assert job["state"] == "succeeded", job
    done = row(context_of(api), job_id)
    assert done.owner == runner.leases.owner and done.lease_until is None
    whitening = api.get(f"{API}/collections/shapes").json()["whitening"]
    assert whitening == 8, whitening
    assert result_path(ctx, job_id).is_file()  # in the shared data folder


@pytest.mark.timeout(180)
def test_an_evaluation_queued_on_an_api_replica_gives_its_result_there(
    api: TestClient, worker: tuple[AppContext, JobRunner]
) -> None:
    accepted = api.post(f"{API}/collections/shapes/evaluate", json=SHORT)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert inputs_path(context_of(api), body["job_id"]).is_file()  # there before a worker claims it
    assert api.get(body["result_url"]).status_code == 409  # not finished: nothing ran it yet

    _, runner = worker
    runner.start_polling()
    assert wait_for(api, body["job_id"], FINAL)["state"] == "succeeded"
    result = api.get(body["result_url"])
    assert result.status_code == 200, result.text
    assert [r["embedder"] for r in result.json()["results"]] == ["tiny-v1", "pixels"]
    assert not inputs_path(context_of(api), body["job_id"]).exists()  # removed once used


def test_an_evaluation_plan_is_rebuilt_whole_from_its_inputs(settings: Settings) -> None:
    """``describe()`` gives the ground truth by its size and no QE weight: the inputs keep both."""
    plan = EvaluationPlan(
        collection="shapes",
        queries=None,
        groundtruth={"q.jpg": ["a.jpg", "b.jpg"], "r.jpg": ["c.jpg"]},
        embedders=("pixels",),
        whiten=(8, 16),
        qe=(0, 3),
        qe_alpha=2.5,
        limit=None,
        estimate=cost.Estimate(12.0, True, "x"),
        sync_budget=1.0,
        job_budget=600.0,
    )
    ctx = open_context(settings)
    try:
        inputs = json.loads(json.dumps(evaluation_inputs(plan)))  # as the file keeps them
        rebuilt = evaluation_plan(ctx, collection="shapes", inputs=inputs, estimate_s=12.0)
    finally:
        ctx.close()
    fields = ("collection", "queries", "groundtruth", "embedders", "whiten", "qe", "qe_alpha", "limit")
    assert {f: getattr(rebuilt, f) for f in fields} == {f: getattr(plan, f) for f in fields}


# -- cancels ---------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_cancel_on_the_api_replica_stops_the_job_a_worker_runs(
    api: TestClient, worker: tuple[AppContext, JobRunner], slow_checks: None
) -> None:
    _, runner = worker
    runner.start_polling()
    accepted = api.post(f"{API}/collections/shapes/whitening", json={"dim": 8})
    job_id = accepted.json()["job_id"]
    assert wait_for(api, job_id, ("running", *FINAL))["state"] == "running"
    cancelled = api.post(f"{API}/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert wait_for(api, job_id, FINAL, timeout=20)["state"] == "cancelled"
    assert api.get(f"{API}/collections/shapes").json()["whitening"] is None


def test_a_job_queued_for_a_worker_is_cancelled_at_once(api: TestClient) -> None:
    accepted = api.post(f"{API}/collections/shapes/evaluate", json=SHORT)
    job_id = accepted.json()["job_id"]
    cancelled = api.post(f"{API}/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text


# -- leases ----------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_in_role_all_the_replica_runs_the_job_under_a_lease_it_renews(
    settings: Settings, slow_checks: None
) -> None:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        fill(client)
        ctx = context_of(client)
        job_id = client.post(f"{API}/collections/shapes/whitening", json={"dim": 8}).json()["job_id"]
        assert wait_for(client, job_id, ("running", *FINAL))["state"] == "running"
        first = row(ctx, job_id)
        assert first.owner == ctx.store.journal.path.name and first.lease_until is not None
        wait_until(lambda: row(ctx, job_id).lease_until > first.lease_until, seconds=10)  # type: ignore[operator]
        assert wait_for(client, job_id, FINAL)["state"] == "succeeded"
        assert row(ctx, job_id).lease_until is None


def test_a_start_leaves_alone_the_jobs_held_under_a_live_lease(api: TestClient, settings: Settings) -> None:
    ctx = context_of(api)
    far = "elsewhere-1234.journal"  # a worker on another machine: its journal is not here
    add_job(ctx, "a" * 32, state="running", owner=far, lease_until=utcnow() + timedelta(hours=1))
    add_job(ctx, "b" * 32, state="running", owner=far, lease_until=utcnow() - timedelta(hours=1))
    add_job(ctx, "c" * 32, state="queued")  # unowned: waits for a worker
    add_job(ctx, "d" * 32, state="running", owner=far)  # held before leases, by a process gone
    tasks = TaskRunner(ctx, runs_jobs=False)
    assert tasks.recover() == 2
    states = {j: (row(ctx, j).state, row(ctx, j).error) for j in ("a" * 32, "b" * 32, "c" * 32, "d" * 32)}
    assert states == {
        "a" * 32: ("running", None),
        "b" * 32: ("failed", INTERRUPTED),
        "c" * 32: ("queued", None),
        "d" * 32: ("failed", INTERRUPTED),
    }


def test_a_worker_taking_over_a_started_job_fails_it_instead_of_running_it_again(
    api: TestClient, worker: tuple[AppContext, JobRunner]
) -> None:
    ctx = context_of(api)
    job_id = "e" * 32
    add_job(
        ctx,
        job_id,
        state="running",
        owner="elsewhere-1234.journal",
        lease_until=utcnow() - timedelta(seconds=5),
    )
    _, runner = worker
    runner.start_polling()
    job = wait_for(api, job_id, FINAL, timeout=30)
    assert (job["state"], job["error"]) == ("failed", INTERRUPTED), job
    assert api.get(f"{API}/collections/shapes").json()["whitening"] is None


@pytest.mark.timeout(180)
def test_a_worker_shutting_down_fails_its_job_as_interrupted(
    api: TestClient, worker: tuple[AppContext, JobRunner], slow_checks: None
) -> None:
    _, runner = worker
    runner.start_polling()
    job_id = api.post(f"{API}/collections/shapes/evaluate", json=SHORT).json()["job_id"]
    assert wait_for(api, job_id, ("running", *FINAL))["state"] == "running"
    runner.shutdown()
    job = wait_for(api, job_id, FINAL, timeout=20)
    assert (job["state"], job["error"]) == ("failed", INTERRUPTED), job


def test_role_all_rows_of_a_dead_process_are_failed_before_the_job_runner_resumes_anything(
    settings: Settings,
) -> None:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        fill(client)
        add_job(context_of(client), "f" * 32, state="running", owner="12345-deadbeef.journal")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        job = client.get(f"{API}/jobs/{'f' * 32}").json()
        assert (job["state"], job["resumes"]) == ("failed", 0), job
