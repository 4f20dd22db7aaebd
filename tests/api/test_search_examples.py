"""POST /collections/{name}/search by several examples: positive and negative ones (uploads and
stored ids) combined into normalize(positive_weight * mean(P) - negative_weight * mean(N))."""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.ingest.sources.datasets import load_mnist
from app.search.examples import MAX_EXAMPLES, NEGATIVE_WEIGHT
from tests.api.helpers import assert_problem
from tests.conftest import DATASETS_DIR

API = "/api/v1"
Files = list[tuple[str, tuple[str | None, bytes | str]]]


def examples(
    client: TestClient,
    collection: str,
    *,
    positive: list[int] = (),  # type: ignore[assignment]
    negative: list[int] = (),  # type: ignore[assignment]
    uploads: Files = (),  # type: ignore[assignment]
    **params: object,
) -> httpx.Response:
    parts: Files = [("positive", (None, str(i))) for i in positive]
    parts += [("negative", (None, str(i))) for i in negative]
    parts += list(uploads)
    form = {key: str(params.pop(key)) for key in ("positive_weight", "negative_weight") if key in params}
    parts += [(key, (None, value)) for key, value in form.items()]
    return client.post(f"{API}/collections/{collection}/search", params=params, files=parts or None)


def upload(client: TestClient, collection: str, data: bytes, label: str | None = None) -> int:
    form = {"metadata": f'{{"label": "{label}"}}'} if label is not None else None
    response = client.post(
        f"{API}/collections/{collection}/images", files={"file": ("a.png", data, "image/png")}, data=form
    )
    assert response.status_code in (200, 201), response.text
    return int(response.json()["id"])


def code(client: TestClient, image_id: int) -> np.ndarray:
    body = client.get(f"{API}/images/{image_id}", params={"include": "embedding"}).json()
    return np.asarray(body["embedding"], dtype=np.float64)


@pytest.fixture
def stored(client: TestClient, collection: str, make_png: Callable[..., bytes]) -> list[int]:
    """Twenty random images labelled 0, 1, 2, 3 in turn."""
    return [upload(client, collection, make_png(seed), str(seed % 4)) for seed in range(20)]


def test_two_positive_ids_and_a_negative_rank_by_the_combined_code(
    client: TestClient, collection: str, stored: list[int]
):
    positive, negative = stored[:2], [stored[2]]

    response = examples(client, collection, positive=positive, negative=negative, k=20)

    assert response.status_code == 200, response.text
    body = response.json()
    ids = [hit["id"] for hit in body["hits"]]
    assert len(ids) == 17 and not set(ids) & {*positive, *negative}  # the examples are left out
    codes = {i: code(client, i) for i in stored}
    query = (codes[positive[0]] + codes[positive[1]]) / 2 - NEGATIVE_WEIGHT * codes[negative[0]]
    query /= np.linalg.norm(query)
    expected = sorted(ids, key=lambda i: -float(codes[i] @ query))
    assert ids == expected
    for hit in body["hits"]:
        assert hit["score"] == pytest.approx(float(codes[hit["id"]] @ query), abs=1e-5)
    assert body["query"] == {
        "positive": [{"image_id": i, "file": None, "weight": 0.5} for i in positive],
        "negative": [{"image_id": negative[0], "file": None, "weight": NEGATIVE_WEIGHT}],
        "positive_weight": 1.0,
        "negative_weight": NEGATIVE_WEIGHT,
    }
    assert body["query_image_id"] is None
    assert {"stored", "search", "fetch", "total"} <= body["timings_ms"].keys()


def test_uploads_and_ids_mix_with_weights_per_side(
    client: TestClient, collection: str, stored: list[int], make_png: Callable[..., bytes]
):
    uploads: Files = [
        ("file", ("q.png", make_png(100))),
        ("positive_file", ("p.png", make_png(101))),
        ("negative_file", ("n.png", make_png(102))),
    ]
    body = examples(
        client, collection, positive=[stored[0]], uploads=uploads, positive_weight=2, negative_weight=1, k=5
    ).json()
    assert [(e["file"], e["image_id"], e["weight"]) for e in body["query"]["positive"]] == [
        ("q.png", None, pytest.approx(2 / 3)),
        ("p.png", None, pytest.approx(2 / 3)),
        (None, stored[0], pytest.approx(2 / 3)),
    ]
    assert body["query"]["negative"] == [{"image_id": None, "file": "n.png", "weight": 1.0}]
    assert stored[0] not in [hit["id"] for hit in body["hits"]]
    # The same images stored: the uploads give the codes the stored copies have.
    ids = [upload(client, collection, make_png(seed)) for seed in (100, 101, 102)]
    again = examples(
        client,
        collection,
        positive=[ids[0], ids[1], stored[0]],
        negative=[ids[2]],
        positive_weight=2,
        negative_weight=1,
        k=5,
    ).json()
    ranking = [(hit["id"], round(hit["score"], 5)) for hit in again["hits"]]
    first = examples(
        client, collection, positive=[stored[0]], uploads=uploads, positive_weight=2, negative_weight=1, k=8
    ).json()
    without = [(hit["id"], round(hit["score"], 5)) for hit in first["hits"] if hit["id"] not in ids]
    assert ranking == without[:5]


def test_one_example_is_the_plain_search_and_a_plain_search_is_unchanged(
    client: TestClient, collection: str, stored: list[int], make_png: Callable[..., bytes]
):
    plain = client.post(f"{API}/collections/{collection}/search", files={"file": ("q.png", make_png(7))})
    assert plain.status_code == 200 and "query" not in plain.json()  # byte for byte as before
    weighted = examples(client, collection, uploads=[("file", ("q.png", make_png(7)))], positive_weight=3)
    assert weighted.json()["hits"] == plain.json()["hits"]
    assert weighted.json()["query"]["positive"] == [{"image_id": None, "file": "q.png", "weight": 3.0}]
    similar = client.get(f"{API}/collections/{collection}/images/{stored[5]}/similar").json()
    by_id = examples(client, collection, positive=[stored[5]]).json()
    assert [(h["id"], round(h["score"], 5)) for h in by_id["hits"]] == [
        (h["id"], round(h["score"], 5)) for h in similar["hits"]
    ]


def test_filters_k_and_query_expansion_apply_as_to_a_single_search(
    client: TestClient, collection: str, stored: list[int]
):
    body = examples(
        client, collection, positive=stored[:2], negative=[stored[3]], k=3, label="1", qe=2
    ).json()
    assert len(body["hits"]) == 3 and {hit["label"] for hit in body["hits"]} == {"1"}
    assert "expand" in body["timings_ms"] and "filter" in body["timings_ms"]


def test_bad_examples_are_4xx_problems(
    client: TestClient, collection: str, stored: list[int], make_png: Callable[..., bytes]
):
    url = f"{API}/collections/{collection}/search"
    assert client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"}).status_code == 201
    elsewhere = upload(client, "other", make_png(500))
    png = make_png(1)
    one = [stored[0]]
    cases: list[tuple[str, httpx.Response, int, str | None]] = [
        ("only negatives", examples(client, collection, negative=stored[:2]), 422, "invalid_request"),
        ("nothing", examples(client, collection, negative_weight=1), 422, "invalid_request"),
        (
            "too many",
            examples(client, collection, positive=stored[:10], negative=stored[10 : MAX_EXAMPLES + 1]),
            422,
            "invalid_request",
        ),
        ("unknown id", examples(client, collection, positive=[*one, 999999]), 404, "image_not_found"),
        (
            "another collection's",
            examples(client, collection, positive=[*one, elsewhere]),
            404,
            "image_not_found",
        ),
        ("not an id", client.post(url, files=[("positive", (None, "abc"))]), 422, "invalid_request"),
        (
            "lax id",
            client.post(url, files=[("positive", (None, "2")), ("negative", (None, "1.0"))]),
            422,
            None,
        ),
        ("id twice", examples(client, collection, positive=one * 2), 422, "invalid_request"),
        ("both sides", examples(client, collection, positive=one, negative=one), 422, "invalid_request"),
        (
            "cancelling",
            examples(
                client,
                collection,
                uploads=[("file", ("a.png", png)), ("negative_file", ("b.png", png))],
                negative_weight=1,
            ),
            422,
            "invalid_request",
        ),
        ("weight below 0", examples(client, collection, positive=one, negative_weight=-1), 422, None),
        ("zero weight", examples(client, collection, positive=one, positive_weight=0), 422, None),
        ("nan weight", examples(client, collection, positive=one, negative_weight="nan"), 422, None),
        (
            "weight twice",
            client.post(
                url, files=[("positive", (None, str(stored[0]))), ("negative_weight", (None, "1"))] * 2
            ),
            400,
            "bad_multipart",
        ),
        (
            "undecodable upload",
            examples(
                client, collection, positive=one, uploads=[("negative_file", ("x.png", b"not an image"))]
            ),
            422,
            None,
        ),
        ("k over the cap", examples(client, collection, positive=one, k=1000), 422, "invalid_request"),
    ]
    for case, response, status, code in cases:
        body = assert_problem(response, status, code)
        if case == "too many":
            assert str(MAX_EXAMPLES) in body["detail"]
        if case == "another collection's":
            assert "other" not in body["detail"]  # nothing about where the image is


def test_openapi_documents_the_example_parts(client: TestClient):
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/api/v1/collections/{name}/search"]["post"]
    ref = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = schema["components"]["schemas"][ref]["properties"]
    assert {"file", "positive_file", "positive", "negative_file", "negative"} <= fields.keys()
    assert {"positive_weight", "negative_weight"} <= fields.keys()
    assert "normalize(" in operation["description"]


# -- the done-when ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """The first 200 MNIST test digits and their labels."""
    images, labels = load_mnist("test", datasets_dir=DATASETS_DIR, download_dir=tmp_path_factory.mktemp("m"))
    return images[:200], labels[:200]


def png_of(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def near_copy(pixels: np.ndarray) -> bytes:
    """The digit shrunk to 24 px and back: other bytes, nearly the same picture."""
    small = Image.fromarray(pixels).resize((24, 24), Image.Resampling.BILINEAR)
    return png_of(np.asarray(small.resize((28, 28), Image.Resampling.BILINEAR)))


def test_a_negative_and_its_near_copy_leave_the_top_10_that_plain_search_shows(
    client: TestClient, digits: tuple[np.ndarray, np.ndarray]
):
    """200 MNIST digits (raw pixels embedder): two sevens as positives find sevens, and the best
    digit of another class with a near copy of it in the top 10; that digit as a negative (the
    default weight) sends both out of the top 10 and leaves as many sevens."""
    images, labels = digits
    assert client.post(f"{API}/collections", json={"name": "digits", "embedder": "pixels"}).is_success
    ids = [
        upload(client, "digits", png_of(pixels), str(label))
        for pixels, label in zip(images, labels, strict=True)
    ]
    label_of = {i: int(label) for i, label in zip(ids, labels, strict=True)}
    positive = [i for i in ids if label_of[i] == 7][:2]

    def top10(negative: list[int] = ()) -> list[int]:  # type: ignore[assignment]
        response = examples(client, "digits", positive=positive, negative=negative, k=10)
        assert response.status_code == 200, response.text
        return [hit["id"] for hit in response.json()["hits"]]

    negative = next(i for i in top10() if label_of[i] != 7)  # the best digit that is not a seven
    copy = upload(client, "digits", near_copy(images[ids.index(negative)]))
    plain = top10()
    assert negative in plain and copy in plain

    combined = top10([negative])

    assert negative not in combined and copy not in combined
    sevens = sum(label_of.get(i) == 7 for i in combined)
    assert sevens >= sum(label_of.get(i) == 7 for i in plain)
