"""POST /collections/{name}/search/batch: many queries in one request, each answered as a single
search answers it, in the order of the parts, with per-query errors."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.access.keys import Scope
from app.api.security import route_rules
from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import assert_problem

API = "/api/v1"
Part = tuple[str, bytes | str]  # ("file", image bytes) or ("image_id", "12")


def multipart(parts: list[Part]) -> tuple[bytes, dict[str, str]]:
    """A multipart body with the parts in this order (httpx puts every field before every file)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for n, (name, value) in enumerate(parts):
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="q{n}.png"\r\n'
            head += "Content-Type: image/png\r\n"
            chunks.append(f"--{boundary}\r\n{head}\r\n".encode() + value + b"\r\n")
        else:
            head = f'Content-Disposition: form-data; name="{name}"\r\n'
            chunks.append(f"--{boundary}\r\n{head}\r\n{value}\r\n".encode())
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def batch(
    client: TestClient, collection: str, parts: list[Part], headers: dict[str, str] | None = None, **params
) -> httpx.Response:
    body, content_type = multipart(parts)
    return client.post(
        f"{API}/collections/{collection}/search/batch",
        params=params,
        content=body,
        headers={**content_type, **(headers or {})},
    )


def single(client: TestClient, collection: str, data: bytes, **params) -> dict:
    response = client.post(
        f"{API}/collections/{collection}/search", params=params, files={"file": ("q.png", data, "image/png")}
    )
    assert response.status_code == 200, response.text
    return response.json()


def ranking(hits: list[dict]) -> list[tuple[int, float]]:
    return [(hit["id"], hit["score"]) for hit in hits]


@pytest.fixture
def filled(client: TestClient, collection: str, make_png: Callable[..., bytes]) -> dict[int, bytes]:
    """Twelve random images labelled 0, 1, 2 in turn, by id."""
    images = {}
    for seed in range(12):
        data = make_png(seed)
        response = client.post(
            f"{API}/collections/{collection}/images",
            files={"file": ("a.png", data, "image/png")},
            data={"metadata": f'{{"label": "{seed % 3}"}}'},
        )
        assert response.status_code == 201, response.text
        images[response.json()["id"]] = data
    return images


def test_batch_answers_equal_single_searches_in_order(
    client: TestClient, collection: str, filled: dict[int, bytes], make_png: Callable[..., bytes]
):
    queries = [make_png(100), *list(filled.values())[:3][::-1], make_png(101)]

    response = batch(client, collection, [("file", data) for data in queries], k=4)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["collection"] == collection and body["k"] == 4
    assert [entry["index"] for entry in body["results"]] == list(range(len(queries)))
    assert [entry["file"] for entry in body["results"]] == [f"q{n}.png" for n in range(len(queries))]
    for data, entry in zip(queries, body["results"], strict=True):
        assert entry["error"] is None and entry["image_id"] is None
        assert ranking(entry["hits"]) == ranking(single(client, collection, data, k=4)["hits"])
        assert [hit["rank"] for hit in entry["hits"]] == [1, 2, 3, 4]
    assert {"decode", "embed", "search", "fetch", "total"} <= body["timings_ms"].keys()


def test_batch_mixes_files_and_stored_ids_in_the_order_sent(
    client: TestClient, collection: str, filled: dict[int, bytes], make_png: Callable[..., bytes]
):
    ids = list(filled)
    parts: list[Part] = [("image_id", str(ids[4])), ("file", make_png(200)), ("image_id", str(ids[0]))]

    body = batch(client, collection, parts, k=3).json()

    first, second, third = body["results"]
    assert (first["image_id"], first["file"]) == (ids[4], None)
    assert (second["image_id"], second["file"]) == (None, "q1.png")
    assert third["image_id"] == ids[0]
    for entry in (first, third):
        similar = client.get(f"{API}/collections/{collection}/images/{entry['image_id']}/similar?k=3").json()
        assert ranking(entry["hits"]) == ranking(similar["hits"])
        assert entry["image_id"] not in [hit["id"] for hit in entry["hits"]]  # itself left out
    assert ranking(second["hits"]) == ranking(single(client, collection, make_png(200), k=3)["hits"])


def test_batch_filters_and_options_apply_to_every_query(
    client: TestClient, collection: str, filled: dict[int, bytes], make_png: Callable[..., bytes]
):
    queries = [make_png(300), make_png(301)]
    body = batch(client, collection, [("file", q) for q in queries], k=5, label="1", qe=1).json()
    for data, entry in zip(queries, body["results"], strict=True):
        assert {hit["label"] for hit in entry["hits"]} == {"1"}
        expected = single(client, collection, data, k=5, label="1", qe=1)["hits"]
        assert ranking(entry["hits"]) == ranking(expected)


def test_a_bad_query_gets_its_error_and_the_others_are_answered(
    client: TestClient, collection: str, filled: dict[int, bytes], make_png: Callable[..., bytes]
):
    other = client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    assert other.status_code == 201
    elsewhere = client.post(
        f"{API}/collections/other/images", files={"file": ("b.png", make_png(999), "image/png")}
    ).json()["id"]
    parts: list[Part] = [
        ("file", make_png(1)),
        ("file", b"this is not an image"),
        ("file", b""),
        ("image_id", "999999"),
        ("image_id", str(elsewhere)),  # another collection's image
        ("image_id", "12abc"),
        ("file", make_png(2)),
    ]

    response = batch(client, collection, parts, k=2)

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    codes = [None if entry["error"] is None else entry["error"]["code"] for entry in results]
    assert codes[0] is None and codes[-1] is None
    assert codes[1] == "not_an_image", results[1]
    assert codes[2] == "empty_upload"
    assert codes[3] == codes[4] == "image_not_found"
    assert codes[5] == "invalid_request"
    for entry in results[1:-1]:
        assert entry["hits"] == [] and 400 <= entry["error"]["status"] < 500 and entry["error"]["detail"]
    assert len(results[0]["hits"]) == len(results[-1]["hits"]) == 2


def test_batch_limits_on_query_count_k_and_bodies(
    settings: Settings, make_png: Callable[..., bytes], collection: str, client: TestClient
):
    image = make_png(0)
    assert batch(client, collection, [("file", image)] * 100, k=1).status_code == 200
    too_many = batch(client, collection, [("file", image)] * 50 + [("image_id", "1")] * 51)
    assert "1 to 100 queries, got 101" in assert_problem(too_many, 422, "invalid_request")["detail"]
    assert_problem(batch(client, collection, []), 422)
    assert_problem(batch(client, collection, [("file", image)], k=101), 422)
    assert_problem(batch(client, collection, [("file", image), ("metadata", "{}")]), 422, "invalid_request")
    assert_problem(batch(client, "nope", [("file", image)]), 404)


def test_batch_holds_each_file_and_the_whole_body_to_their_limits(
    settings: Settings, make_png: Callable[..., bytes]
):
    small = settings.model_copy(update={"max_upload_bytes": 4096})
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        assert client.post(f"{API}/collections", json={"name": "s", "embedder": "tiny"}).status_code == 201
        client.post(f"{API}/collections/s/images", files={"file": ("a.png", make_png(0), "image/png")})
        big = make_png(1, size=(64, 64), mode="RGB")  # about 12 KiB: over the 4 KiB per file
        assert len(big) > 4096
        entries = batch(client, "s", [("file", big), ("file", make_png(0))]).json()["results"]
        assert entries[0]["error"]["code"] == "payload_too_large" and entries[1]["hits"]
        whole = batch(client, "s", [("file", big)] * 20)  # 240 KiB > 5 x 4 KiB + multipart overhead
        assert "larger than its" in assert_problem(whole, 413, "payload_too_large")["detail"]


READ_KEY = "read-" + "r" * 30


@pytest.fixture
def keyed(settings: Settings, make_png: Callable[..., bytes]) -> Iterator[TestClient]:
    admin = "admin-" + "a" * 30
    keys = SecretStr(f"admin:{admin},read:{READ_KEY}")
    with TestClient(
        create_app(settings.model_copy(update={"api_keys": keys, "search_requires_key": True})),
        raise_server_exceptions=False,
    ) as c:
        headers = {"X-API-Key": admin}
        assert c.post(
            f"{API}/collections", json={"name": "s", "embedder": "tiny"}, headers=headers
        ).is_success
        c.post(f"{API}/collections/s/images", files={"file": ("a.png", make_png(0))}, headers=headers)
        yield c


def test_batch_needs_the_read_scope_as_the_single_search_does(
    keyed: TestClient, make_png: Callable[..., bytes]
):
    rules = {rule.path: rule.scope for rule in route_rules(keyed.app) if "POST" in rule.methods}  # type: ignore[arg-type]
    assert rules[f"{API}/collections/{{name}}/search/batch"] is Scope.read
    assert rules[f"{API}/collections/{{name}}/search"] is Scope.read
    assert_problem(batch(keyed, "s", [("file", make_png(0))]), 401, "unauthorized")
    unkeyed_single = keyed.post(f"{API}/collections/s/search", files={"file": ("q.png", make_png(0))})
    assert_problem(unkeyed_single, 401, "unauthorized")
    assert_problem(batch(keyed, "s", [("file", make_png(0))], headers={"X-API-Key": "nope" * 8}), 401)
    answered = batch(keyed, "s", [("file", make_png(0))], headers={"X-API-Key": READ_KEY})
    assert answered.status_code == 200 and answered.json()["results"][0]["hits"]
