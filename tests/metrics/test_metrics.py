"""GET /metrics: scraped after real traffic and parsed with prometheus-client's own parser."""

from __future__ import annotations

import io
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app.catalog.collections import create_collection
from app.context import open_context
from app.core.settings import Settings
from app.ingest import jobs, pipeline
from app.ingest.sources.folder import check_folder
from app.main import create_app
from tests.api.helpers import assert_problem

API = "/api/v1"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

READ_KEY = "read-key-of-the-metrics-tests"
WRITE_KEY = "write-key-of-the-metrics-tests"
KEYS = SecretStr(f"read:{READ_KEY},write:{WRITE_KEY}")


def scrape(client: TestClient, headers: dict[str, str] | None = None) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def upload_response(client: TestClient, data: bytes, name: str = "a.png") -> httpx.Response:
    return client.post(f"{API}/collections/shapes/images", files={"file": (name, data, "image/png")})


def upload(client: TestClient, data: bytes, name: str = "a.png") -> int:
    response = upload_response(client, data, name)
    assert response.status_code in (200, 201), response.text
    return response.status_code


def zipped(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def wait_for_job(client: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 30
    while (job := client.get(f"{API}/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_metrics_count_uploads_searches_and_an_import(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    statuses = [upload(client, make_png(seed)) for seed in (1, 2, 3)] + [upload(client, make_png(1))]
    assert statuses == [201, 201, 201, 200]  # the last one a duplicate
    for seed in (1, 2):
        response = client.post(
            f"{API}/collections/shapes/search", files={"file": ("q.png", make_png(seed), "image/png")}
        )
        assert response.status_code == 200, response.text
    first = client.get(f"{API}/collections/shapes/images").json()[0]["id"]
    assert client.get(f"{API}/collections/shapes/images/{first}/similar").status_code == 200
    files = [("file", (f"q{seed}.png", make_png(seed), "image/png")) for seed in (4, 5)]
    assert client.post(f"{API}/collections/shapes/search/batch", files=files).status_code == 200
    archive = zipped(
        {"a/10.png": make_png(10), "a/11.png": make_png(11), "b/1.png": make_png(1), "bad.png": b"x"}
    )
    started = client.post(
        f"{API}/collections/shapes/imports", files={"file": ("in.zip", archive, "application/zip")}
    )
    assert started.status_code == 202, started.text
    job = wait_for_job(client, started.json()["job_id"])
    assert (job["state"], job["added"], job["duplicates"], job["failed"]) == ("succeeded", 2, 1, 1)

    samples = scrape(client)

    upload_route = {"route": "/api/v1/collections/{name}/images", "method": "POST"}
    assert value(samples, "cbir_http_requests_total", **upload_route, status="201") == 3
    assert value(samples, "cbir_http_requests_total", **upload_route, status="200") == 1
    assert value(samples, "cbir_http_request_duration_seconds_count", **upload_route, status="201") == 3
    assert value(samples, "cbir_http_request_duration_seconds_sum", **upload_route, status="201") > 0
    search_route = {"route": "/api/v1/collections/{name}/search", "method": "POST", "status": "200"}
    assert value(samples, "cbir_http_requests_total", **search_route) == 2
    assert (
        value(samples, "cbir_http_requests_total", route="/api/v1/jobs/{job_id}", method="GET", status="200")
        >= 1
    )

    # Stages: two searches by image and one by a stored image; one batch of two files.
    assert value(samples, "cbir_search_stage_seconds_count", search="single", stage="total") == 3
    assert value(samples, "cbir_search_stage_seconds_count", search="single", stage="decode") == 2
    for stage in ("embed", "search", "fetch"):
        assert value(samples, "cbir_search_stage_seconds_count", search="single", stage=stage) == 3
    assert value(samples, "cbir_search_stage_seconds_count", search="batch", stage="total") == 1
    assert value(samples, "cbir_search_stage_seconds_sum", search="single", stage="total") > 0

    # Forward passes: queries 1 + 1 + 2 images; uploads 3 (the duplicate is not embedded); the
    # import 2 (the duplicate and the bad file are not).
    assert value(samples, "cbir_embed_images_total", source="query") == 4
    assert value(samples, "cbir_embed_batch_size_count", source="query") == 3
    assert value(samples, "cbir_embed_batch_size_sum", source="query") == 4
    assert value(samples, "cbir_embed_images_total", source="upload") == 3
    assert value(samples, "cbir_embed_images_total", source="import") == 2
    assert value(samples, "cbir_embed_batch_size_sum", source="import") == 2
    for source in ("query", "upload", "import"):
        assert value(samples, "cbir_embed_seconds_total", source=source) > 0
    assert value(samples, "cbir_ingest_images_total", source="upload", result="added") == 3
    assert value(samples, "cbir_ingest_images_total", source="upload", result="duplicate") == 1
    assert value(samples, "cbir_ingest_images_total", source="import", result="added") == 2
    assert value(samples, "cbir_ingest_images_total", source="import", result="duplicate") == 1
    assert value(samples, "cbir_ingest_images_total", source="import", result="rejected") == 1

    # What is read at scrape time equals what the API says.
    info = client.get(f"{API}/collections/shapes").json()
    assert info["image_count"] == info["index_size"] == 5
    assert value(samples, "cbir_collection_images", collection="shapes") == 5
    assert value(samples, "cbir_collection_vectors", collection="shapes") == 5
    assert value(samples, "cbir_jobs", kind="import", state="succeeded") == 1
    assert value(samples, "cbir_state_up") == 1
    assert total(samples, "cbir_index_rebuilds_total") == 0  # a new collection's empty index is none
    assert total(samples, "cbir_admission_refusals_total") == 0

    # The scrape itself is counted by the next one.
    again = scrape(client)
    assert value(again, "cbir_http_requests_total", route="/metrics", method="GET", status="200") == 1


def test_metrics_count_an_index_rebuild(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed in range(3):
        upload(client, make_png(seed))
    response = client.put(f"{API}/collections/shapes/index", json={"factory": "HNSW16"})
    assert response.status_code == 202, response.text
    assert client.app.state.context.indexes.wait_for_build(1, timeout=30)  # type: ignore[attr-defined]
    samples = scrape(client)
    assert value(samples, "cbir_index_rebuilds_total", collection="shapes") == 1
    assert value(samples, "cbir_collection_vectors", collection="shapes") == 3


def test_label_values_never_hold_paths_ids_or_client_text(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    upload(client, make_png(0), name="secret-file-name.png")
    sent = [
        client.get(f"{API}/images/987654321"),
        client.get(f"{API}/images/987654321/file"),
        client.get(f"{API}/collections/unknown-secret-collection"),
        client.get("/a/secret/path/that/no/route/has"),
        client.get("/static/secret-static-name.js"),
        client.delete(f"{API}/collections/shapes/search"),  # a known path, another method
        client.request("BREW", f"{API}/collections"),
        client.get(f"{API}/jobs", params={"state": "secret-state"}),
    ]
    assert [r.status_code for r in sent] == [404, 404, 404, 404, 404, 405, 405, 422]
    samples = scrape(client)
    labels = {(name, value) for (_, have) in samples for name, value in have}
    for needle in ("987654321", "secret", "BREW"):
        assert not [label for label in labels if needle in label[1]], needle
    routes = {v for name, v in labels if name == "route"}
    assert {
        "unmatched",
        "/static/{path}",
        "/api/v1/images/{image_id}",
        "/api/v1/images/{image_id}/file",
    } <= routes
    assert "/api/v1/collections/{name}/search" in routes  # the 405 under its route's template
    assert (
        value(samples, "cbir_http_requests_total", route="/api/v1/collections", method="other", status="405")
        == 1
    )
    assert value(samples, "cbir_http_requests_total", route="unmatched", method="GET", status="404") == 1
    # Collections appear by name only, and only those that exist.
    assert {v for name, v in labels if name == "collection"} == {"shapes"}


@pytest.fixture
def keyed(settings: Settings) -> Iterator[TestClient]:
    with TestClient(
        create_app(settings.model_copy(update={"api_keys": KEYS})), raise_server_exceptions=False
    ) as c:
        yield c


def test_metrics_need_a_read_key_when_keys_are_on(keyed: TestClient) -> None:
    assert_problem(keyed.get("/metrics"), 401, "unauthorized")
    assert_problem(keyed.get("/metrics", headers={"X-API-Key": "not-a-key-of-this-service"}), 401)
    scrape(keyed, headers={"X-API-Key": READ_KEY})
    samples = scrape(keyed, headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert value(samples, "cbir_http_requests_total", route="/metrics", method="GET", status="401") == 2
    assert "/metrics" not in keyed.get("/openapi.json").json()["paths"]  # the JSON API's document only


@pytest.mark.parametrize("search_requires_key", [False, True])
def test_metrics_public_setting_opens_them_without_a_key(
    settings: Settings, search_requires_key: bool
) -> None:
    update = {"api_keys": KEYS, "metrics_public": True, "search_requires_key": search_requires_key}
    with TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False) as client:
        scrape(client)
        assert client.get(f"{API}/collections").status_code == (401 if search_requires_key else 200)


def test_metrics_count_rate_limit_refusals(settings: Settings) -> None:
    update = {"metrics_public": True, "rate_limit_per_minute": 2, "rate_limit_burst": 2}
    with TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False) as client:
        assert [client.get(f"{API}/collections").status_code for _ in range(3)] == [200, 200, 429]
        samples = scrape(client)  # public: not rate limited itself
    assert value(samples, "cbir_admission_refusals_total", reason="rate_limit") == 1
    assert (
        value(samples, "cbir_http_requests_total", route="/api/v1/collections", method="GET", status="429")
        == 1
    )


def test_metrics_count_pending_embeds_and_decode_memory_refusals(
    settings: Settings, make_png: Callable[..., bytes]
) -> None:
    """With the decode memory budget held here, a search waits for it (the one request in flight
    that CBIR_MAX_PENDING_EMBEDS=1 allows): an upload meanwhile is refused by admission; after
    the search gave up, an upload that may not wait is refused by the decode memory budget."""
    update = {"max_pending_embeds": 1, "decode_budget_wait_s": 1.0}
    with TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False) as client:
        assert (
            client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
        )
        budget = client.app.state.context.decode_budget  # type: ignore[attr-defined]
        held = budget.acquire(budget.capacity, timeout=None)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                client.post,
                f"{API}/collections/shapes/search",
                files={"file": ("q.png", make_png(1), "image/png")},
            )
            deadline = time.monotonic() + 10
            while budget.waiting == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert_problem(upload_response(client, make_png(2)), 503, "overloaded")  # admission
            assert_problem(waiting.result(), 503, "overloaded")  # the budget stayed full for 1 s
        assert_problem(upload_response(client, make_png(3)), 503, "overloaded")  # the budget again
        budget.release(held)
        assert upload_response(client, make_png(4)).status_code == 201
        samples = scrape(client)
    assert value(samples, "cbir_admission_refusals_total", reason="pending_embeds") == 1
    assert value(samples, "cbir_admission_refusals_total", reason="decode_memory") == 2


def test_an_import_in_worker_processes_counts_their_forward_passes(
    settings: Settings, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    """The workers' forward passes come back with their vectors and are counted in this process."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("worker processes are used on two cores or more")
    ctx = open_context(settings.model_copy(update={"import_processes": True, "import_workers": 1}))
    try:
        create_collection(ctx, name="p", embedder="tiny")
        folder = tmp_path / "images"
        folder.mkdir()
        for i in range(12):
            (folder / f"{i:02d}.png").write_bytes(make_png(i))
        runner = jobs.JobRunner(ctx)
        assert pipeline.use_processes(ctx)
        job_id = runner.create_job(collection="p", source=check_folder(folder))
        runner.run_import(job_id=job_id, collection="p", source=check_folder(folder))
        assert jobs.get_job(ctx, job_id).record.added == 12
        sample = ctx.metrics.registry.get_sample_value
        assert sample("cbir_embed_images_total", {"source": "import"}) == 12
        assert sample("cbir_embed_batch_size_sum", {"source": "import"}) == 12
        assert (sample("cbir_embed_seconds_total", {"source": "import"}) or 0) > 0
        assert sample("cbir_ingest_images_total", {"source": "import", "result": "added"}) == 12
    finally:
        ctx.close()


def test_metrics_of_a_milvus_vector_store(
    settings: Settings, milvus_uri: str, make_png: Callable[..., bytes]
) -> None:
    """The vectors gauge and the rebuild counter also come from the vector-store backend."""
    update = {
        "vector_store": milvus_uri.replace("http://", "milvus://"),
        "vector_store_prefix": f"t{uuid.uuid4().hex[:16]}",
    }
    with TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False) as client:
        assert (
            client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
        )
        for seed in range(3):
            upload(client, make_png(seed))
        assert client.put(f"{API}/collections/shapes/index", json={"factory": "HNSW16"}).status_code in (
            200,
            202,
        )
        assert client.get(f"{API}/collections/shapes/index").json()["kind"] == "HNSW16"
        samples = scrape(client)
    assert value(samples, "cbir_collection_vectors", collection="shapes") == 3
    assert value(samples, "cbir_index_rebuilds_total", collection="shapes") == 1
