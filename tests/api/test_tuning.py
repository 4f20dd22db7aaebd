"""Search options, whitening and the synchronous evaluate endpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from tests.api.helpers import assert_problem
from tests.holidays import holidays_subset


def _upload_folder(client: TestClient, collection: str, folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        response = client.post(
            f"/api/v1/collections/{collection}/images",
            files={"file": (path.name, path.read_bytes(), "image/jpeg")},
        )
        assert response.status_code in (200, 201), response.text


def test_search_options_are_stored_shown_and_validated(client: TestClient, collection: str) -> None:
    response = client.put(f"/api/v1/collections/{collection}/search-options", json={"qe": 2, "qe_alpha": 1.5})
    assert response.status_code == 200, response.text
    assert response.json()["search_options"] == {"qe": 2, "qe_alpha": 1.5}
    assert client.get(f"/api/v1/collections/{collection}").json()["search_options"]["qe"] == 2
    assert_problem(client.put(f"/api/v1/collections/{collection}/search-options", json={"qe": 99}), 422)
    assert_problem(client.put("/api/v1/collections/missing/search-options", json={"qe": 1}), 404)


def test_search_with_query_expansion(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed in range(12):
        client.post(
            f"/api/v1/collections/{collection}/images", files={"file": (f"{seed}.png", make_png(seed))}
        )
    plain = client.post(
        f"/api/v1/collections/{collection}/search?k=5", files={"file": ("q.png", make_png(3))}
    )
    expanded = client.post(
        f"/api/v1/collections/{collection}/search?k=5&qe=2", files={"file": ("q.png", make_png(3))}
    )
    assert plain.status_code == expanded.status_code == 200
    assert "expand" in expanded.json()["timings_ms"] and "expand" not in plain.json()["timings_ms"]
    assert len(expanded.json()["hits"]) == 5
    image_id = plain.json()["hits"][0]["id"]
    similar = client.get(f"/api/v1/collections/{collection}/images/{image_id}/similar?k=3&qe=1")
    assert similar.status_code == 200 and image_id not in [h["id"] for h in similar.json()["hits"]]
    bad = client.post(
        f"/api/v1/collections/{collection}/search?qe=-1", files={"file": ("q.png", make_png(3))}
    )
    assert_problem(bad, 422)


def test_whitening_endpoint_serves_whitened_codes(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed in range(20):
        client.post(
            f"/api/v1/collections/{collection}/images", files={"file": (f"{seed}.png", make_png(seed))}
        )
    response = client.post(f"/api/v1/collections/{collection}/whitening", json={"dim": 8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["whitening"] == 8 and body["dim"] == 8 and body["index_size"] == 20
    hit = client.post(f"/api/v1/collections/{collection}/search?k=1", files={"file": ("q.png", make_png(7))})
    assert hit.json()["hits"][0]["original_name"] == "7.png"
    too_many = client.post(f"/api/v1/collections/{collection}/whitening", json={"dim": 64})
    assert "needs at least" in assert_problem(too_many, 422)["detail"]


def test_evaluate_endpoint_with_groundtruth(client: TestClient, tmp_path: Path) -> None:
    truth = holidays_subset(tmp_path / "jpg", groups=(1000, 1001, 1002))
    assert client.post("/api/v1/collections", json={"name": "photos", "embedder": "tiny"}).status_code == 201
    _upload_folder(client, "photos", tmp_path / "jpg")
    response = client.post(
        "/api/v1/collections/photos/evaluate",
        json={"groundtruth": truth, "embedders": ["tiny", "pixels"], "qe": [0, 1]},
    )
    assert response.status_code == 200, response.text
    rows = response.json()["results"]
    assert [(r["embedder"], r["qe"]) for r in rows] == [
        ("tiny", 0),
        ("tiny", 1),
        ("pixels", 0),
        ("pixels", 1),
    ]
    assert all(r["queries"] == 3 and 0 < r["map_all"] <= 1 for r in rows)
    assert rows[2]["embed_img_s"] > 0


def test_evaluate_endpoint_rejects_bad_requests(client: TestClient, collection: str) -> None:
    url = f"/api/v1/collections/{collection}/evaluate"
    assert "not both" in assert_problem(client.post(url, json={}), 422)["detail"]
    both = {"queries": "mnist:test", "groundtruth": {"a.jpg": ["b.jpg"]}}
    assert_problem(client.post(url, json=both), 422)
    assert_problem(client.post(url, json={"groundtruth": {"a.jpg": ["b.jpg"]}}), 422)
    unknown = client.post(url, json={"groundtruth": {"a.jpg": []}, "embedders": ["nope"]})
    assert_problem(unknown, 422, "unknown_embedder")
    options = client.post(url, json={"groundtruth": {"a.jpg": []}, "embedders": ["resnet18:pooling=foo"]})
    assert_problem(options, 422, "invalid_embedder_options")
    assert_problem(client.post("/api/v1/collections/missing/evaluate", json={"groundtruth": {"a": []}}), 404)


def test_refitting_the_same_whitening_twice_is_a_new_artefact_not_a_conflict(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed in range(12):
        client.post(
            f"/api/v1/collections/{collection}/images", files={"file": (f"{seed}.png", make_png(seed))}
        )
    versions = []
    for dim in (8, 4, 8):
        response = client.post(f"/api/v1/collections/{collection}/whitening", json={"dim": dim})
        assert response.status_code == 200, response.text
        versions.append(response.json()["embedder_version"])
    assert len(set(versions)) == 3


def test_evaluate_bounds_and_specs_are_checked_before_any_work(client: TestClient, collection: str) -> None:
    url = f"/api/v1/collections/{collection}/evaluate"
    truth = {"a.jpg": ["b.jpg"]}
    assert_problem(client.post(url, json={"groundtruth": truth, "whiten": [-1]}), 422)
    assert_problem(client.post(url, json={"groundtruth": truth, "qe": [99]}), 422)
    bad = client.post(url, json={"queries": "mnist:test", "embedders": ["efficientnet_lite0:foo=1"]})
    assert_problem(bad, 422, "invalid_embedder_options")
    assert_problem(client.post(url, json={"queries": "mnist:test", "embedders": ["checkpoint:²"]}), 422)
    compare = client.get(f"/api/v1/collections/{collection}/images/1/compare?against=tiny:nope=1")
    assert compare.status_code in (404, 422), compare.text  # never a 500
