"""Finding 12: input the service could read two ways is refused, saying why: a label that is not
a string or a number, a second file (or metadata) part, a scalar query parameter given twice, an
id that is not a decimal integer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import assert_problem
from tests.redteam.user_text import API, image_count, manifest_import, seeded, upload


# -- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ['{"a": 1}', "[1, 2]", "true"])
def test_manifest_row_whose_label_is_not_a_string_or_number_is_rejected(
    client: TestClient, collection: str, make_png: Callable[..., bytes], label: str
) -> None:
    files = {f"shots/{i}.png": make_png(100 + i) for i in range(3)}
    job = manifest_import(
        client,
        collection,
        files=files,
        rows=[
            '{"path": "shots/0.png", "label": "cat"}',
            f'{{"path": "shots/1.png", "label": {label}}}',
            '{"path": "shots/2.png", "label": 7}',
        ],
    )
    assert job["state"] == "succeeded", job
    assert (job["added"], job["failed"]) == (2, 1), job
    rejected = {item: code for item, (status, code) in job["report"].items() if status == "rejected"}
    assert rejected == {"row 2": "bad_metadata"}
    (error,) = job["errors"]
    assert "label" in error["detail"], error
    labels = client.get(f"{API}/collections/{collection}/labels").json()["labels"]
    assert sorted(row["label"] for row in labels) == ["7", "cat"]


@pytest.mark.parametrize("label", ['{"a": 1}', "[1]", "true"])
def test_upload_whose_label_is_not_a_string_or_number_is_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes], label: str
) -> None:
    body = assert_problem(
        upload(client, collection, make_png(1), f'{{"label": {label}}}'), 422, "bad_metadata"
    )
    assert "label" in body["detail"]
    assert image_count(client, collection) == 0


# -- repeated parts and parameters -----------------------------------------------------------------
def test_upload_with_two_file_parts_is_refused_and_stores_nothing(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    response = client.post(
        f"{API}/collections/{collection}/images",
        files=[("file", ("a.png", make_png(1))), ("file", ("b.png", make_png(2)))],
    )
    body = assert_problem(response, 400, "bad_multipart")
    assert "'file'" in body["detail"] and "once" in body["detail"], body
    assert image_count(client, collection) == 0


def test_upload_with_two_metadata_parts_is_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    response = client.post(
        f"{API}/collections/{collection}/images",
        files=[
            ("file", ("a.png", make_png(1))),
            ("metadata", (None, '{"label": "a"}')),
            ("metadata", (None, '{"label": "b"}')),
        ],
    )
    assert "'metadata'" in assert_problem(response, 400, "bad_multipart")["detail"]
    assert image_count(client, collection) == 0


def test_search_with_two_query_images_is_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    seeded(client, collection, make_png)
    response = client.post(
        f"{API}/collections/{collection}/search",
        files=[("file", ("a.png", make_png(1))), ("file", ("b.png", make_png(2)))],
    )
    assert_problem(response, 400, "bad_multipart")


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/collections/{c}/images/{id}/similar", "k=3&k=50"),
        ("/collections/{c}/images", "limit=1&limit=2"),
        ("/collections/{c}/images", "label=5&offset=0&offset=1"),
        ("/collections/{c}/labels", "limit=1&limit=5"),
        ("/images/{id}/thumbnail", "size=32&size=64"),
    ],
)
def test_a_scalar_query_parameter_given_twice_is_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes], path: str, query: str
) -> None:
    ids = seeded(client, collection, make_png)
    url = API + path.format(c=collection, id=ids[0]) + "?" + query
    body = assert_problem(client.get(url), 422, "invalid_request")
    name = query.rsplit("&", 1)[1].split("=")[0]
    assert f"'{name}'" in body["detail"] and "once" in body["detail"], body


def test_search_with_k_given_twice_is_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    seeded(client, collection, make_png)
    response = client.post(
        f"{API}/collections/{collection}/search?k=3&k=50", files={"file": ("q.png", make_png(1))}
    )
    assert_problem(response, 422, "invalid_request")


def test_repeatable_filters_stay_repeatable(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    ids = seeded(client, collection, make_png)
    browse = client.get(f"{API}/collections/{collection}/images?label=5&label=6")
    assert browse.status_code == 200, browse.text
    assert sorted(row["id"] for row in browse.json()) == ids
    both = client.get(f"{API}/collections/{collection}/images?meta=label:5&meta=split:train")
    assert [row["id"] for row in both.json()] == ids[:1]


# -- ids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["1.0", "+1", "1_0", "%201", "1e0", "0x1", "01.", "%D9%A1"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/images/{id}"),
        ("GET", "/images/{id}/file"),
        ("GET", "/images/{id}/thumbnail"),
        ("DELETE", "/images/{id}"),
        ("GET", "/collections/{c}/images/{id}/similar"),
    ],
)
def test_an_image_id_that_is_not_a_decimal_integer_is_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes], raw: str, method: str, path: str
) -> None:
    ids = seeded(client, collection, make_png)
    assert ids[0] == 1
    response = client.request(method, API + path.format(c=collection, id=raw))
    body = assert_problem(response, 422, "invalid_request")
    assert "decimal" in body["detail"], body
    assert image_count(client, collection) == len(ids)


def test_a_decimal_id_with_leading_zeros_is_the_same_id(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    ids = seeded(client, collection, make_png)
    response = client.get(f"{API}/images/00{ids[0]}")
    assert response.status_code == 200 and response.json()["id"] == ids[0], response.text
