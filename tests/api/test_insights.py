"""Evaluation in the background, the side-by-side compare and the 2-D map of a collection."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from index.projection import available_methods
from tests.api.test_imports import assert_problem
from tests.conftest import encode

API = "/api/v1"


def upload(client: TestClient, collection: str, data: bytes, metadata: dict) -> int:
    response = client.post(
        f"{API}/collections/{collection}/images",
        files={"file": ("x.png", data, "image/png")},
        data={"metadata": json.dumps(metadata)},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


@pytest.fixture
def labelled(client: TestClient, collection: str, make_png: Callable[..., bytes]) -> list[int]:
    """Twelve images labelled with digits 0-3 (enough for P@10)."""
    return [upload(client, collection, make_png(seed), {"label": str(seed % 4)}) for seed in range(12)]


def evaluation(client: TestClient, collection: str) -> dict:
    response = client.get(f"{API}/collections/{collection}/evaluation")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_evaluations(client: TestClient) -> None:
    client.app.state.evaluations.wait(timeout=120)  # type: ignore[attr-defined]


# -- evaluation ---------------------------------------------------------------------------------
def test_evaluation_runs_in_the_background_and_is_cached_with_a_curve(
    client: TestClient, collection: str, labelled: list[int]
) -> None:
    before = evaluation(client, collection)
    assert before["latest"] is None and before["running"] == [] and before["failure"] is None
    assert "mnist:test" in before["query_sets"]
    specs = [choice["spec"] for choice in before["compare_choices"]]
    assert "pixels" in specs and "efficientnet_lite0" in specs  # its weights ship with the package

    started = client.post(
        f"{API}/collections/{collection}/evaluation",
        json={"queries": "mnist:test", "limit": 20, "compare": ["pixels"]},
    )
    assert started.status_code == 202, started.text
    wait_for_evaluations(client)
    after = evaluation(client, collection)

    latest = after["latest"]
    assert after["running"] == [] and after["failure"] is None
    assert latest["queries"] == "mnist:test" and latest["limit"] == 20 and latest["compare"] == ["pixels"]
    assert [row["embedder"] for row in latest["results"]] == ["tiny-v1", "pixels"]
    for row in latest["results"]:
        assert row["queries"] == 20 and row["database"] == 12
        assert 0 <= row["p_at_10"] <= 1 and 0 <= row["map_all"] <= 1
        curve = row["pr_curve"]
        assert curve["recall"] == pytest.approx([i / 10 for i in range(11)])
        assert len(curve["precision"]) == 11
        assert all(a >= b - 1e-9 for a, b in zip(curve["precision"], curve["precision"][1:], strict=False))
    cached = list((client.app.state.context.settings.data_dir / "evaluations" / collection).glob("*.json"))  # type: ignore[attr-defined]
    assert len(cached) == 1


def test_evaluation_of_a_collection_without_labels_is_refused_before_it_starts(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed in range(11):
        upload(client, collection, make_png(seed), {"label": "1"})
    upload(client, collection, make_png(99), {})

    response = client.post(f"{API}/collections/{collection}/evaluation", json={"limit": 5})
    assert response.status_code == 422, response.text
    assert "needs a 'label'" in response.json()["detail"]
    after = evaluation(client, collection)
    assert after["latest"] is None and after["running"] == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"queries": "cifar:test"}, "unknown query set"),
        ({"queries": "mnist:test", "compare": ["resnet9000"]}, "unknown embedder"),
        ({"queries": "mnist:test", "compare": ["cdae"]}, "checkpoint:ID"),
        ({"queries": "mnist:test", "compare": ["checkpoint:999"]}, "no checkpoint"),
        ({"queries": "mnist:test", "compare": ["checkpoint:abc"]}, "no checkpoint"),
        ({"queries": "mnist:test", "limit": 0}, "limit"),
        ({"queries": "mnist:test", "compare": ["pixels"] * 5}, "compare"),
    ],
)
def test_bad_evaluation_requests_are_422(
    client: TestClient, collection: str, body: dict, fragment: str
) -> None:
    response = client.post(f"{API}/collections/{collection}/evaluation", json=body)

    assert fragment in assert_problem(response, 422, "invalid_request")["detail"]


def test_evaluation_of_unknown_collection_is_404(client: TestClient) -> None:
    assert_problem(client.get(f"{API}/collections/nope/evaluation"), 404, "collection_not_found")
    assert_problem(client.post(f"{API}/collections/nope/evaluation", json={}), 404, "collection_not_found")


# -- side by side -------------------------------------------------------------------------------
def test_compare_searches_the_same_sample_under_two_embedders(
    client: TestClient, collection: str, labelled: list[int], make_png: Callable[..., bytes]
) -> None:
    stored = client.get(
        f"{API}/collections/{collection}/images/{labelled[0]}/compare",
        params={"against": "pixels", "k": 5, "sample": 8},
    )
    uploaded = client.post(
        f"{API}/collections/{collection}/compare",
        params={"against": "pixels", "k": 3},
        files={"file": ("q.png", make_png(4))},
    )

    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert body["sample"] == 8 and body["total"] == 12 and body["query_image_id"] == labelled[0]
    assert [side["embedder"] for side in body["sides"]] == ["tiny-v1", "pixels"]
    assert [side["source"] for side in body["sides"]] == ["stored codes", "computed for this comparison"]
    for side in body["sides"]:
        ranks = [hit["rank"] for hit in side["hits"]]
        assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) <= 5
        assert labelled[0] not in [hit["id"] for hit in side["hits"]]
        scores = [hit["score"] for hit in side["hits"]]
        assert scores == sorted(scores, reverse=True)
    assert uploaded.status_code == 200, uploaded.text
    top = uploaded.json()["sides"][1]["hits"][0]
    assert top["id"] == labelled[4] and top["score"] == pytest.approx(1.0, abs=1e-5)  # same pixels


def test_compare_rejects_bad_input(client: TestClient, collection: str, labelled: list[int]) -> None:
    path = f"{API}/collections/{collection}/images/{labelled[0]}/compare"
    assert_problem(client.get(path, params={"against": "nope"}), 422, "invalid_request")
    assert_problem(client.get(path, params={"against": "cdae"}), 422, "invalid_request")
    assert_problem(client.get(path), 422, "invalid_request")  # against is required
    assert_problem(client.get(path, params={"against": "pixels", "sample": 0}), 422, "invalid_request")
    assert_problem(client.get(path, params={"against": "pixels", "k": 101}), 422, "invalid_request")
    assert_problem(
        client.get(f"{API}/collections/nope/images/{labelled[0]}/compare", params={"against": "pixels"}),
        404,
        "collection_not_found",
    )
    assert_problem(
        client.get(f"{API}/collections/{collection}/images/999999/compare", params={"against": "pixels"}),
        404,
        "image_not_found",
    )


def test_compare_with_an_image_of_another_collection_is_404(
    client: TestClient, collection: str, labelled: list[int], make_png: Callable[..., bytes]
) -> None:
    client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    foreign = upload(client, "other", make_png(500), {"label": "x"})

    response = client.get(
        f"{API}/collections/{collection}/images/{foreign}/compare", params={"against": "pixels"}
    )

    assert_problem(response, 404, "image_not_found")


def test_compare_and_map_of_an_untrained_collection_are_409(client: TestClient) -> None:
    client.post(f"{API}/collections", json={"name": "digits", "embedder": "cdae"})

    assert_problem(client.get(f"{API}/collections/digits/map"), 409, "embedder_not_ready")
    assert_problem(
        client.get(f"{API}/collections/digits/images/1/compare", params={"against": "pixels"}),
        409,
        "embedder_not_ready",
    )


# -- map ----------------------------------------------------------------------------------------
def test_map_projects_a_sample_with_labels(client: TestClient, collection: str, labelled: list[int]) -> None:
    response = client.get(f"{API}/collections/{collection}/map")
    sampled = client.get(f"{API}/collections/{collection}/map", params={"sample": 5}).json()

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "pca" and body["methods"][0] == "pca"
    assert body["sample"] == body["total"] == 12 and body["embedder_version"] == "tiny-v1"
    assert sorted(point["id"] for point in body["points"]) == sorted(labelled)
    assert {point["label"] for point in body["points"]} == {"0", "1", "2", "3"}
    assert all(isinstance(point["x"], float) and isinstance(point["y"], float) for point in body["points"])
    assert len(body["explained_variance"]) == 2
    assert sampled["sample"] == 5 and sampled["total"] == 12
    assert sampled["points"][0]["id"] == labelled[0] and sampled["points"][-1]["id"] == labelled[-1]


def test_map_of_an_empty_collection_has_no_points(client: TestClient, collection: str) -> None:
    body = client.get(f"{API}/collections/{collection}/map").json()

    assert body["points"] == [] and body["total"] == 0


def test_map_rejects_bad_input(client: TestClient, collection: str) -> None:
    path = f"{API}/collections/{collection}/map"
    assert_problem(client.get(path, params={"method": "tsne"}), 422, "invalid_request")
    assert_problem(client.get(path, params={"sample": 0}), 422, "invalid_request")
    assert_problem(client.get(path, params={"sample": 10_001}), 422, "invalid_request")
    assert_problem(client.get(f"{API}/collections/nope/map"), 404, "collection_not_found")
    if "umap" not in available_methods():
        body = assert_problem(client.get(path, params={"method": "umap"}), 422, "invalid_request")
        assert "umap-learn" in body["detail"]


def test_a_second_checkpoint_of_the_collection_can_be_compared(client: TestClient) -> None:
    from app.ingest.sources.datasets import load_mnist
    from app.ingest.store import Item, ingest_batch
    from app.learning.training import train_cdae

    ctx = client.app.state.context  # type: ignore[attr-defined]
    images, labels = load_mnist(
        "train", datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir
    )
    client.post(f"{API}/collections", json={"name": "digits", "embedder": "cdae"})
    items = [
        Item(f"d{i}.png", encode(Image.fromarray(images[i])), {"label": str(labels[i])}) for i in range(200)
    ]
    ingest_batch(ctx, collection="digits", items=items)
    active = train_cdae(ctx, collection="digits", epochs=1, preset="tutorial")
    other = train_cdae(ctx, collection="digits", epochs=1, preset="tutorial", seed=1, activate=False)

    choices = [c["spec"] for c in evaluation(client, "digits")["compare_choices"]]
    response = client.get(
        f"{API}/collections/digits/images/1/compare",
        params={"against": f"checkpoint:{other.id}", "sample": 100},
    )

    assert f"checkpoint:{other.id}" in choices and f"checkpoint:{active.id}" not in choices
    assert "pixels" in choices and "cdae" not in choices
    assert response.status_code == 200, response.text
    sides = response.json()["sides"]
    assert sides[0]["embedder"] == active.version and sides[1]["embedder"].startswith(other.version)
    assert all(len(side["hits"]) == 10 for side in sides)


def test_evaluation_with_queries_labelled_unlike_the_collection_is_refused_clearly(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed in range(12):
        upload(client, collection, make_png(seed), {"label": "cat" if seed % 2 else "dog"})

    response = client.post(f"{API}/collections/{collection}/evaluation", json={"limit": 5})
    assert response.status_code == 422, response.text
    assert "none of the labels of mnist:test" in response.json()["detail"]
