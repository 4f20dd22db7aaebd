"""Label counts of a collection, and the list of import jobs."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.api.test_imports import assert_problem, make_zip, run_import

API = "/api/v1"


def upload(client: TestClient, collection: str, data: bytes, metadata: dict) -> None:
    response = client.post(
        f"{API}/collections/{collection}/images",
        files={"file": ("x.png", data, "image/png")},
        data={"metadata": json.dumps(metadata)},
    )
    assert response.status_code == 201, response.text


def test_labels_are_counted_most_common_first(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed, meta in enumerate([{"label": "b"}, {"label": "a"}, {"label": "b"}, {"label": 7}, {}, {"x": 1}]):
        upload(client, collection, make_png(seed), meta)

    body = client.get(f"{API}/collections/{collection}/labels").json()

    assert body["collection"] == collection
    assert body["total"] == 6 and body["unlabelled"] == 2 and body["distinct"] == 3
    assert body["labels"] == [
        {"label": "b", "count": 2},
        {"label": "7", "count": 1},  # a number is counted as its text
        {"label": "a", "count": 1},
    ]
    limited = client.get(f"{API}/collections/{collection}/labels", params={"limit": 1}).json()
    assert limited["labels"] == [{"label": "b", "count": 2}] and limited["distinct"] == 3


def test_labels_of_an_empty_or_unknown_collection(client: TestClient, collection: str) -> None:
    empty = client.get(f"{API}/collections/{collection}/labels").json()
    assert empty == {"collection": collection, "total": 0, "distinct": 0, "unlabelled": 0, "labels": []}
    assert_problem(client.get(f"{API}/collections/nope/labels"), 404, "collection_not_found")
    assert_problem(
        client.get(f"{API}/collections/{collection}/labels", params={"limit": 0}), 422, "invalid_request"
    )


def test_jobs_are_listed_newest_first_with_filters(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    first = run_import(client, collection, make_zip({"a/1.png": make_png(1)}))
    second = run_import(client, "other", make_zip({"b/2.png": make_png(2)}))

    everything = client.get(f"{API}/jobs").json()["jobs"]
    mine = client.get(f"{API}/jobs", params={"collection": collection}).json()["jobs"]
    succeeded = client.get(f"{API}/jobs", params={"state": "succeeded"}).json()["jobs"]
    running = client.get(f"{API}/jobs", params={"state": "running"}).json()["jobs"]

    assert [job["id"] for job in everything] == [second["id"], first["id"]]
    assert [job["id"] for job in mine] == [first["id"]]
    assert {job["id"] for job in succeeded} == {first["id"], second["id"]}
    assert running == []
    job = everything[0]
    assert job["collection"] == "other" and job["done"] == job["total"] == 1
    assert job["eta_seconds"] is None  # finished
    assert client.get(f"{API}/jobs", params={"limit": 1}).json()["jobs"][0]["id"] == second["id"]


def test_job_list_keeps_only_the_first_errors_but_counts_all(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    archive = make_zip({"a/ok.png": make_png(1), **{f"a/bad{i}.png": b"not an image" for i in range(3)}})
    job = run_import(client, collection, archive)
    assert job["failed"] == 3 and len(job["errors"]) == 3

    listed = client.get(f"{API}/jobs", params={"errors": 1}).json()["jobs"][0]
    full = client.get(f"{API}/jobs/{job['id']}").json()

    assert listed["failed"] == 3 and len(listed["errors"]) == 1
    assert len(full["errors"]) == 3


def test_job_list_rejects_bad_input(client: TestClient) -> None:
    assert_problem(client.get(f"{API}/jobs", params={"collection": "nope"}), 404, "collection_not_found")
    body = assert_problem(client.get(f"{API}/jobs", params={"state": "sleeping"}), 422, "invalid_request")
    assert "queued, running, succeeded, failed" in body["detail"]
    assert_problem(client.get(f"{API}/jobs", params={"limit": 0}), 422, "invalid_request")
    assert_problem(client.get(f"{API}/jobs", params={"limit": 201}), 422, "invalid_request")
