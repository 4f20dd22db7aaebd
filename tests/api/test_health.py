"""Health: the service says it is up and how full each collection and its index are."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from app import __version__

API = "/api/v1"


def test_health_is_ok_with_no_collections(client: TestClient):
    response = client.get(f"{API}/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    device = client.app.state.context.device.type  # "cpu" here, "cuda" on a GPU machine
    assert response.json() == {
        "status": "ok",
        "version": __version__,
        "device": device,
        "collections": [],
        "degraded": [],
        "runtimes": [],  # no pretrained CNN loaded
    }


def test_health_counts_images_and_indexed_vectors_per_collection(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    client.post(f"{API}/collections", json={"name": "digits", "embedder": "cdae"})
    for seed in range(3):
        client.post(f"{API}/collections/{collection}/images", files={"file": ("a.png", make_png(seed))})
    client.post(f"{API}/collections/digits/images", files={"file": ("a.png", make_png(9))})

    body = client.get(f"{API}/health").json()
    assert body["status"] == "ok"
    assert body["collections"] == [
        {"name": "digits", "images": 1, "indexed": 0},  # untrained: stored, not yet indexed
        {"name": collection, "images": 3, "indexed": 3},
    ]


def test_health_only_answers_get(client: TestClient):
    response = client.post(f"{API}/health")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
