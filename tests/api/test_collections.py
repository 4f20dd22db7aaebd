"""Collections: create, list, get, delete, browse; every error is a problem document."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import assert_problem

API = "/api/v1"
PROBLEM = "application/problem+json"


def upload(client: TestClient, collection: str, data: bytes, name: str = "a.png") -> httpx.Response:
    return client.post(f"{API}/collections/{collection}/images", files={"file": (name, data, "image/png")})


def test_create_collection_returns_201_with_description(client: TestClient):
    response = client.post(f"{API}/collections", json={"name": "holidays", "embedder": "tiny"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "holidays" and body["embedder"] == "tiny"
    assert body["embedder_version"] == "tiny-v1"
    assert body["ready"] is True
    assert body["image_count"] == body["embedded_count"] == body["index_size"] == 0
    assert body["index_factory"] == "auto"  # exact while small (GET ./index says which kind serves)


def test_trainable_embedder_collection_is_created_but_not_ready(client: TestClient):
    response = client.post(f"{API}/collections", json={"name": "digits", "embedder": "cdae"})
    assert response.status_code == 201, response.text
    assert response.json()["ready"] is False
    assert response.json()["embedder_version"] is None


def test_list_collections_is_sorted_by_name(client: TestClient):
    for name in ("zebra", "apple", "mango"):
        assert client.post(f"{API}/collections", json={"name": name, "embedder": "tiny"}).status_code == 201
    response = client.get(f"{API}/collections")
    assert response.status_code == 200
    assert [c["name"] for c in response.json()["collections"]] == ["apple", "mango", "zebra"]


def test_list_collections_is_empty_at_start(client: TestClient):
    assert client.get(f"{API}/collections").json() == {"collections": []}


def test_duplicate_collection_is_409(client: TestClient, collection: str):
    response = client.post(f"{API}/collections", json={"name": collection, "embedder": "tiny"})
    assert_problem(response, 409, "collection_exists")


@pytest.mark.parametrize(
    "name", ["", "Upper", "-leading-dash", "has space", "dots.dot", "../etc", "a" * 65, "ünïcode"]
)
def test_invalid_collection_name_is_422(client: TestClient, name: str):
    response = client.post(f"{API}/collections", json={"name": name, "embedder": "tiny"})
    assert_problem(response, 422, "invalid_request")
    assert client.get(f"{API}/collections").json() == {"collections": []}


def test_unknown_embedder_is_422(client: TestClient):
    response = client.post(f"{API}/collections", json={"name": "x", "embedder": "resnet9000"})
    body = assert_problem(response, 422, "unknown_embedder")
    assert "resnet9000" in body["detail"]


@pytest.mark.parametrize("body", [{}, {"embedder": "tiny"}, {"name": 7}, [1, 2]])
def test_malformed_create_body_is_422(client: TestClient, body: object):
    assert_problem(client.post(f"{API}/collections", json=body), 422, "invalid_request")


def test_create_body_that_is_not_json_is_422(client: TestClient):
    response = client.post(
        f"{API}/collections", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "invalid_request")


def test_get_collection_counts_uploaded_images(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    for seed in range(3):
        assert upload(client, collection, make_png(seed)).status_code == 201
    body = client.get(f"{API}/collections/{collection}").json()
    assert body["image_count"] == body["embedded_count"] == body["index_size"] == 3
    assert body["dim"] == 64


def test_get_unknown_collection_is_404(client: TestClient):
    body = assert_problem(client.get(f"{API}/collections/nope"), 404, "collection_not_found")
    assert "nope" in body["detail"]


def test_delete_unknown_collection_is_404(client: TestClient):
    assert_problem(client.delete(f"{API}/collections/nope"), 404, "collection_not_found")


def test_delete_collection_removes_images_files_and_index(
    client: TestClient, collection: str, make_png: Callable[..., bytes], settings
):
    ids = [upload(client, collection, make_png(seed)).json()["id"] for seed in range(3)]
    client.app.state.context.indexes.flush_all()
    assert list(settings.index_dir.glob("*.cbidx"))

    response = client.delete(f"{API}/collections/{collection}")
    assert response.status_code == 204 and response.content == b""

    assert_problem(client.get(f"{API}/collections/{collection}"), 404, "collection_not_found")
    for image_id in ids:
        assert_problem(client.get(f"{API}/images/{image_id}"), 404, "image_not_found")
    assert not [p for p in settings.images_dir.rglob("*") if p.is_file()]
    assert not list(settings.index_dir.glob("*.cbidx"))


def test_deleting_a_collection_keeps_files_shared_with_another(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    data = make_png(1)
    upload(client, collection, data)
    kept = upload(client, "other", data).json()["id"]

    assert client.delete(f"{API}/collections/{collection}").status_code == 204

    response = client.get(f"{API}/images/{kept}/file")
    assert response.status_code == 200 and response.content == data


def test_collection_name_can_be_reused_after_delete(client: TestClient, collection: str):
    assert client.delete(f"{API}/collections/{collection}").status_code == 204
    response = client.post(f"{API}/collections", json={"name": collection, "embedder": "tiny"})
    assert response.status_code == 201


def test_browse_images_pages_in_insertion_order_with_total(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    ids = [upload(client, collection, make_png(seed), f"{seed}.png").json()["id"] for seed in range(5)]

    first = client.get(f"{API}/collections/{collection}/images", params={"offset": 0, "limit": 2})
    rest = client.get(f"{API}/collections/{collection}/images", params={"offset": 2, "limit": 10})

    assert first.status_code == rest.status_code == 200
    assert first.headers["x-total-count"] == rest.headers["x-total-count"] == "5"
    assert [i["id"] for i in first.json()] + [i["id"] for i in rest.json()] == ids
    assert first.json()[0]["original_name"] == "0.png"
    assert first.json()[0]["collection"] == collection


def test_browse_past_the_end_is_empty_with_total(client: TestClient, collection: str, make_png):
    upload(client, collection, make_png(0))
    response = client.get(f"{API}/collections/{collection}/images", params={"offset": 10})
    assert response.status_code == 200 and response.json() == []
    assert response.headers["x-total-count"] == "1"


@pytest.mark.parametrize("params", [{"offset": -1}, {"limit": 0}, {"limit": 501}, {"offset": "x"}])
def test_browse_rejects_bad_paging(client: TestClient, collection: str, params: dict):
    response = client.get(f"{API}/collections/{collection}/images", params=params)
    assert_problem(response, 422, "invalid_request")


def test_browse_unknown_collection_is_404(client: TestClient):
    assert_problem(client.get(f"{API}/collections/nope/images"), 404, "collection_not_found")


def test_unknown_route_is_a_problem_not_html(client: TestClient):
    assert_problem(client.get(f"{API}/no/such/route"), 404, "not_found")


def test_wrong_method_is_a_405_problem(client: TestClient):
    assert_problem(client.put(f"{API}/collections"), 405, "method_not_allowed")
