"""Filters by label or metadata (``label=``, ``meta=KEY:VALUE``) on browse, search and similar."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.api.test_imports import assert_problem

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
def mixed(client: TestClient, collection: str, make_png: Callable[..., bytes]) -> dict[str, list[int]]:
    """Twelve images: labels a/b/c, split train/test, an integer index, one without a label."""
    ids: dict[str, list[int]] = {"a": [], "b": [], "c": [], "none": []}
    for seed in range(12):
        label = "abc"[seed % 3]
        meta = {"label": label, "split": "train" if seed < 8 else "test", "index": seed}
        if seed == 11:
            meta = {"split": "test", "index": seed}
            label = "none"
        ids[label].append(upload(client, collection, make_png(seed), meta))
    return ids


def browse(client: TestClient, collection: str, **params: object):  # type: ignore[no-untyped-def]
    return client.get(f"{API}/collections/{collection}/images", params={"limit": 100, **params})


def test_browse_by_label_counts_and_lists_only_that_label(
    client: TestClient, collection: str, mixed: dict[str, list[int]]
) -> None:
    response = browse(client, collection, label="a")

    assert response.status_code == 200
    assert response.headers["X-Total-Count"] == "4"
    assert [image["id"] for image in response.json()] == mixed["a"]


def test_browse_by_metadata_compares_numbers_as_text(
    client: TestClient, collection: str, mixed: dict[str, list[int]]
) -> None:
    by_index = browse(client, collection, meta="index:5")
    both = browse(client, collection, meta=["split:test", "index:9"])
    label_and_meta = browse(client, collection, label="b", meta="split:train")

    assert [image["metadata"]["index"] for image in by_index.json()] == [5]
    assert [image["metadata"]["index"] for image in both.json()] == [9]
    assert label_and_meta.headers["X-Total-Count"] == "3"  # seeds 1, 4, 7
    assert all(image["metadata"]["label"] == "b" for image in label_and_meta.json())


def test_browse_pages_through_a_filtered_set(
    client: TestClient, collection: str, mixed: dict[str, list[int]]
) -> None:
    first = browse(client, collection, label="c", limit=2, offset=0)
    second = browse(client, collection, label="c", limit=2, offset=2)

    assert first.headers["X-Total-Count"] == second.headers["X-Total-Count"] == "3"
    assert [i["id"] for i in first.json()] + [i["id"] for i in second.json()] == mixed["c"]


def test_filter_values_are_data_not_sql(
    client: TestClient, collection: str, mixed: dict[str, list[int]]
) -> None:
    for hostile in ("a' OR '1'='1", 'a" OR 1=1 --', "%", "a'); DROP TABLE images; --"):
        response = browse(client, collection, label=hostile)
        assert response.status_code == 200
        assert response.headers["X-Total-Count"] == "0", hostile
    assert browse(client, collection).headers["X-Total-Count"] == "12"


def test_search_with_a_label_returns_only_that_label(
    client: TestClient, collection: str, mixed: dict[str, list[int]], make_png: Callable[..., bytes]
) -> None:
    response = client.post(
        f"{API}/collections/{collection}/search",
        params={"k": 10, "label": "b"},
        files={"file": ("q.png", make_png(0))},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(hit["id"] for hit in body["hits"]) == sorted(mixed["b"])
    assert all(hit["label"] == "b" for hit in body["hits"])
    assert [hit["rank"] for hit in body["hits"]] == [1, 2, 3, 4]
    assert "filter" in body["timings_ms"]


def test_similar_with_a_filter_leaves_out_the_query_and_other_labels(
    client: TestClient, collection: str, mixed: dict[str, list[int]]
) -> None:
    query = mixed["a"][0]
    response = client.get(
        f"{API}/collections/{collection}/images/{query}/similar", params={"k": 10, "meta": "split:train"}
    )

    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert query not in [hit["id"] for hit in hits]
    assert len(hits) == 7  # eight train images, the query left out
    assert all(hit["metadata"]["split"] == "train" for hit in hits)


def test_filter_matching_nothing_gives_no_hits(
    client: TestClient, collection: str, mixed: dict[str, list[int]], make_png: Callable[..., bytes]
) -> None:
    response = client.post(
        f"{API}/collections/{collection}/search",
        params={"label": "zebra"},
        files={"file": ("q.png", make_png(0))},
    )

    assert response.status_code == 200
    assert response.json()["hits"] == []


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"meta": "split"}, "KEY:VALUE"),
        ({"meta": ":train"}, "metadata key"),
        ({"meta": "bad key:1"}, "metadata key"),
        ({"meta": 'a"b:1'}, "metadata key"),
        ({"meta": "k:" + "x" * 257}, "longer than"),
        ({"meta": [f"k{i}:v" for i in range(9)]}, "at most 8"),
        ({"label": "x" * 257}, "label"),
    ],
)
def test_invalid_filters_are_422(
    client: TestClient, collection: str, make_png: Callable[..., bytes], params: dict, fragment: str
) -> None:
    image_id = upload(client, collection, make_png(1), {"label": "a"})
    responses = [
        browse(client, collection, **params),
        client.post(
            f"{API}/collections/{collection}/search", params=params, files={"file": ("q.png", make_png(2))}
        ),
        client.get(f"{API}/collections/{collection}/images/{image_id}/similar", params=params),
    ]
    for response in responses:
        body = assert_problem(response, 422, "invalid_request")
        assert fragment in body["detail"]


def test_filters_on_unknown_collection_are_404(client: TestClient) -> None:
    assert_problem(browse(client, "nope", label="a"), 404, "collection_not_found")
