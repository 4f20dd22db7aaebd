"""Query by example and "more like this": ranking, k limits and the errors around them."""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.helpers import assert_problem
from tests.conftest import encode

API = "/api/v1"
PROBLEM = "application/problem+json"


def upload(client: TestClient, collection: str, data: bytes, *, label: str | None = None) -> int:
    form = {"metadata": f'{{"label": "{label}"}}'} if label is not None else None
    response = client.post(
        f"{API}/collections/{collection}/images", files={"file": ("a.png", data, "image/png")}, data=form
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def search(client: TestClient, collection: str, data: bytes, **params: object) -> httpx.Response:
    return client.post(
        f"{API}/collections/{collection}/search", params=params, files={"file": ("q.png", data, "image/png")}
    )


@pytest.fixture
def filled(client: TestClient, collection: str, make_png: Callable[..., bytes]) -> dict[int, bytes]:
    """Twelve random images in the collection, by id."""
    images = {}
    for seed in range(12):
        data = make_png(seed)
        images[upload(client, collection, data, label=str(seed % 3))] = data
    return images


def test_search_with_the_same_bytes_finds_the_image_first(
    client: TestClient, collection: str, filled: dict[int, bytes]
):
    for image_id, data in list(filled.items())[:4]:
        response = search(client, collection, data, k=3)
        assert response.status_code == 200, response.text
        hits = response.json()["hits"]
        assert hits[0]["id"] == image_id
        assert hits[0]["score"] >= 0.999


def test_search_hits_are_ranked_by_score_with_labels_and_urls(
    client: TestClient, collection: str, filled: dict[int, bytes]
):
    image_id, data = next(iter(filled.items()))
    body = search(client, collection, data, k=5).json()
    assert body["collection"] == collection and body["k"] == 5 and body["query_image_id"] is None
    hits = body["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 - 1e-6 <= s <= 1.0 + 1e-6 for s in scores)
    assert len({h["id"] for h in hits}) == 5
    first = hits[0]
    assert first["label"] == first["metadata"]["label"] == "0"
    assert first["image_url"] == f"{API}/images/{image_id}/file"
    assert first["thumbnail_url"] == f"{API}/images/{image_id}/thumbnail"
    assert {"decode", "embed", "search", "fetch", "total"} <= body["timings_ms"].keys()


def test_search_k_defaults_to_10(client: TestClient, collection: str, filled: dict[int, bytes]):
    body = search(client, collection, next(iter(filled.values()))).json()
    assert body["k"] == 10 and len(body["hits"]) == 10


def test_search_with_k_above_the_image_count_returns_every_image(
    client: TestClient, collection: str, filled: dict[int, bytes]
):
    hits = search(client, collection, next(iter(filled.values())), k=100).json()["hits"]
    assert sorted(h["id"] for h in hits) == sorted(filled)


def test_search_finds_a_resized_copy(client: TestClient, collection: str, make_png: Callable[..., bytes]):
    for seed in range(6):
        upload(client, collection, make_png(seed, size=(64, 64), mode="RGB"))
    target = upload(client, collection, make_png(99, size=(64, 64), mode="RGB"))
    original = Image.open(io.BytesIO(make_png(99, size=(64, 64), mode="RGB")))
    query = encode(original.resize((128, 128), Image.Resampling.NEAREST), "JPEG", quality=95)
    hits = search(client, collection, query, k=1).json()["hits"]
    assert hits[0]["id"] == target and hits[0]["score"] > 0.95


def test_search_in_an_empty_collection_has_no_hits(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    response = search(client, collection, make_png(0))
    assert response.status_code == 200 and response.json()["hits"] == []


@pytest.mark.parametrize("k", [0, -1, 101, "ten"])
def test_search_rejects_k_out_of_range(
    client: TestClient, collection: str, make_png: Callable[..., bytes], k: object
):
    assert_problem(search(client, collection, make_png(0), k=k), 422, "invalid_request")


def test_search_accepts_k_at_the_maximum(client: TestClient, collection: str, make_png: Callable[..., bytes]):
    assert search(client, collection, make_png(0), k=100).status_code == 200


def test_search_in_unknown_collection_is_404(client: TestClient, make_png: Callable[..., bytes]):
    assert_problem(search(client, "nope", make_png(0)), 404, "collection_not_found")


def test_search_with_an_untrained_embedder_is_409(client: TestClient, make_png: Callable[..., bytes]):
    client.post(f"{API}/collections", json={"name": "digits", "embedder": "cdae"})
    upload(client, "digits", make_png(0))
    body = assert_problem(search(client, "digits", make_png(0)), 409, "embedder_not_ready")
    assert "cbir train" in body["detail"]


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_upload"),
        (b"definitely not an image", 422, "not_an_image"),
        (encode(Image.new("RGB", (8, 8)), "BMP"), 415, "unsupported_format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "unsupported_format"),
    ],
    ids=["empty", "text", "bmp", "svg"],
)
def test_search_rejects_bad_query_images(
    client: TestClient, collection: str, filled: dict[int, bytes], data: bytes, status: int, code: str
):
    assert_problem(search(client, collection, data), status, code)


def test_search_rejects_a_truncated_query(client: TestClient, collection: str, filled: dict[int, bytes]):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "PNG")
    assert_problem(search(client, collection, data[: len(data) // 2]), 422, "image_truncated")


def test_search_without_a_file_is_422(client: TestClient, collection: str):
    assert_problem(client.post(f"{API}/collections/{collection}/search"), 422, "invalid_request")


# -- more like this ---------------------------------------------------------------------------
def test_similar_excludes_the_image_itself(client: TestClient, collection: str, filled: dict[int, bytes]):
    image_id = next(iter(filled))
    response = client.get(f"{API}/collections/{collection}/images/{image_id}/similar", params={"k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query_image_id"] == image_id
    ids = [h["id"] for h in body["hits"]]
    assert len(ids) == 5 and image_id not in ids
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_similar_with_k_above_the_rest_returns_all_others(
    client: TestClient, collection: str, filled: dict[int, bytes]
):
    image_id = next(iter(filled))
    body = client.get(f"{API}/collections/{collection}/images/{image_id}/similar", params={"k": 100}).json()
    assert sorted(h["id"] for h in body["hits"]) == sorted(set(filled) - {image_id})


def test_similar_agrees_with_search_by_the_same_bytes(
    client: TestClient, collection: str, filled: dict[int, bytes]
):
    image_id, data = next(iter(filled.items()))
    by_bytes = [h["id"] for h in search(client, collection, data, k=6).json()["hits"]]
    similar = client.get(f"{API}/collections/{collection}/images/{image_id}/similar", params={"k": 5})
    assert [h["id"] for h in similar.json()["hits"]] == by_bytes[1:]


def test_similar_of_the_only_image_is_empty(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    image_id = upload(client, collection, make_png(0))
    body = client.get(f"{API}/collections/{collection}/images/{image_id}/similar").json()
    assert body["hits"] == []


def test_similar_of_an_image_in_another_collection_is_404(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    elsewhere = upload(client, "other", make_png(0))
    response = client.get(f"{API}/collections/{collection}/images/{elsewhere}/similar")
    assert_problem(response, 404, "image_not_found")


def test_similar_of_unknown_image_is_404(client: TestClient, collection: str):
    assert_problem(client.get(f"{API}/collections/{collection}/images/999/similar"), 404, "image_not_found")


def test_similar_in_unknown_collection_is_404(client: TestClient):
    assert_problem(client.get(f"{API}/collections/nope/images/1/similar"), 404, "collection_not_found")


def test_similar_of_a_deleted_image_is_404(client: TestClient, collection: str, filled: dict[int, bytes]):
    image_id = next(iter(filled))
    client.delete(f"{API}/images/{image_id}")
    assert_problem(
        client.get(f"{API}/collections/{collection}/images/{image_id}/similar"), 404, "image_not_found"
    )


@pytest.mark.parametrize("k", [0, 101])
def test_similar_rejects_k_out_of_range(
    client: TestClient, collection: str, filled: dict[int, bytes], k: int
):
    image_id = next(iter(filled))
    response = client.get(f"{API}/collections/{collection}/images/{image_id}/similar", params={"k": k})
    assert_problem(response, 422, "invalid_request")


def test_similar_with_an_untrained_embedder_is_409(client: TestClient, make_png: Callable[..., bytes]):
    client.post(f"{API}/collections", json={"name": "digits", "embedder": "cdae"})
    image_id = upload(client, "digits", make_png(0))
    response = client.get(f"{API}/collections/digits/images/{image_id}/similar")
    assert_problem(response, 409, "embedder_not_ready")
