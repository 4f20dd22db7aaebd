"""Import jobs: per-file report, cancel, and server-sent progress events."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from app.catalog.collections import create_collection, get_collection
from app.context import AppContext
from app.ingest import jobs
from app.ingest.sources.folder import check_folder
from tests.api.helpers import assert_problem
from tests.api.test_imports import make_zip, wait_for_job

API = "/api/v1"


def _import(client: TestClient, collection: str, members: dict[str, bytes]) -> dict:
    response = client.post(
        f"{API}/collections/{collection}/imports",
        files={"file": ("a.zip", make_zip(members), "application/zip")},
    )
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"])


def test_the_report_lists_every_file_with_its_outcome(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    members = {"a/1.png": make_png(1), "a/2.png": make_png(2), "b/copy.png": make_png(1), "bad.png": b"nope"}
    job = _import(client, collection, members)
    response = client.get(f"{API}/jobs/{job['id']}/report")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    rows = {row["item"]: row for row in map(json.loads, response.text.splitlines())}
    assert set(rows) == set(members)
    assert rows["a/1.png"]["status"] == "added" and rows["a/1.png"]["image_id"] > 0
    assert rows["b/copy.png"]["status"] == "duplicate"
    assert rows["bad.png"]["status"] == "rejected" and rows["bad.png"]["code"] == "not_an_image"
    assert_problem(client.get(f"{API}/jobs/0123456789abcdef/report"), 404, "job_not_found")


def test_events_stream_progress_then_end(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    job = _import(client, collection, {"1.png": make_png(1)})
    with client.stream("GET", f"{API}/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [block for block in text.strip().split("\n\n") if block]
    assert events[0].startswith("event: progress\ndata: ") and events[-1].startswith("event: end\ndata: ")
    final = json.loads(events[-1].split("data: ", 1)[1])
    assert final["state"] == "succeeded" and final["added"] == 1
    assert_problem(client.get(f"{API}/jobs/0123456789abcdef/events"), 404, "job_not_found")


def test_a_finished_job_cannot_be_cancelled(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    job = _import(client, collection, {"1.png": make_png(1)})
    assert_problem(client.post(f"{API}/jobs/{job['id']}/cancel"), 409, "job_finished")
    assert_problem(client.post(f"{API}/jobs/0123456789abcdef/cancel"), 404, "job_not_found")


def test_cancel_stops_a_running_import_after_its_batch_and_keeps_what_it_stored(
    ctx: AppContext, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    batch = ctx.settings.import_batch_size
    for seed in range(batch + 40):
        (folder / f"{seed:04d}.png").write_bytes(make_png(seed, size=(8, 8)))
    create_collection(ctx, name="many", embedder="tiny")
    runner = jobs.JobRunner(ctx)
    source = check_folder(folder)
    job_id = runner.create_job(collection="many", source=source)
    runner.run_import(
        job_id=job_id,
        collection="many",
        source=source,
        on_progress=lambda counts, total: runner.cancel(job_id),
    )
    record = jobs.get_job(ctx, job_id).record
    assert record.state == "cancelled" and record.done == batch
    info = get_collection(ctx, "many")
    assert info.image_count == info.index_size == batch


def test_a_queued_job_cancelled_never_runs(
    ctx: AppContext, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "1.png").write_bytes(make_png(1))
    create_collection(ctx, name="one", embedder="tiny")
    runner = jobs.JobRunner(ctx)
    source = check_folder(tmp_path / "one")
    job_id = runner.create_job(collection="one", source=source)
    assert runner.cancel(job_id).record.state == "cancelled"
    runner.run_import(job_id=job_id, collection="one", source=source)
    assert jobs.get_job(ctx, job_id).record.state == "cancelled"
    assert get_collection(ctx, "one").image_count == 0
