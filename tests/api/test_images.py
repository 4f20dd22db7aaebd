"""Uploading, fetching and deleting images, and every way an upload can be refused."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from app.core.settings import Settings
from tests.api.helpers import assert_problem
from tests.conftest import encode

API = "/api/v1"
PROBLEM = "application/problem+json"


def upload(
    client: TestClient,
    collection: str,
    data: bytes,
    *,
    name: str = "a.png",
    content_type: str = "image/png",
    metadata: str | None = None,
) -> httpx.Response:
    form = {"metadata": metadata} if metadata is not None else None
    return client.post(
        f"{API}/collections/{collection}/images", files={"file": (name, data, content_type)}, data=form
    )


def search(client: TestClient, collection: str, data: bytes, k: int = 10) -> httpx.Response:
    return client.post(
        f"{API}/collections/{collection}/search",
        params={"k": k},
        files={"file": ("q.png", data, "image/png")},
    )


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries a few bytes of pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def gif_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is ``width`` x ``height`` holding one 1x1 frame."""
    return (
        b"GIF89a"
        + struct.pack("<HH", width, height)
        + b"\x00\x00\x00"
        + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def noise(size: tuple[int, int] = (64, 64), mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)


# -- uploads that succeed ---------------------------------------------------------------------
def test_upload_returns_201_with_the_stored_image(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    data = make_png(1, size=(30, 20))
    response = upload(client, collection, data, name="cat.png", metadata='{"label": "cat", "n": 3}')
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] is True
    image = body["image"]
    assert image["id"] == body["id"]
    assert image["collection"] == collection
    assert (image["width"], image["height"], image["format"]) == (30, 20, "PNG")
    assert image["byte_size"] == len(data)
    assert image["original_name"] == "cat.png"
    assert image["metadata"] == {"label": "cat", "n": 3}
    assert image["image_url"] == f"{API}/images/{body['id']}/file"
    assert image["thumbnail_url"] == f"{API}/images/{body['id']}/thumbnail"


def test_same_bytes_again_returns_200_and_the_same_id(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    data = make_png(2)
    first = upload(client, collection, data)
    again = upload(client, collection, data, name="other-name.png")
    assert first.status_code == 201 and again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["index_size"] == 1


def test_same_bytes_in_another_collection_is_a_new_image(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    data = make_png(3)
    first = upload(client, collection, data)
    second = upload(client, "other", data)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] != second.json()["id"]


def test_upload_without_metadata_stores_an_empty_object(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    response = upload(client, collection, make_png(4), metadata="")
    assert response.status_code == 201
    assert response.json()["image"]["metadata"] == {}


@pytest.mark.parametrize(
    ("image_format", "params", "media_type"),
    [("JPEG", {"quality": 90}, "image/jpeg"), ("GIF", {}, "image/gif"), ("WEBP", {}, "image/webp")],
)
def test_upload_accepts_allowed_formats(
    client: TestClient, collection: str, image_format: str, params: dict, media_type: str
):
    data = encode(noise(), image_format, **params)
    response = upload(client, collection, data, name="x.bin", content_type="application/octet-stream")
    assert response.status_code == 201, response.text
    assert response.json()["image"]["format"] == image_format
    file = client.get(response.json()["image"]["image_url"])
    assert file.headers["content-type"] == media_type


def test_upload_to_untrained_collection_stores_the_row_without_a_vector(
    client: TestClient, make_png: Callable[..., bytes]
):
    client.post(f"{API}/collections", json={"name": "digits", "embedder": "cdae"})
    response = upload(client, "digits", make_png(5))
    assert response.status_code == 201, response.text
    info = client.get(f"{API}/collections/digits").json()
    assert info["image_count"] == 1 and info["embedded_count"] == 0 and info["index_size"] == 0


# -- uploads that are refused -----------------------------------------------------------------
def test_upload_to_unknown_collection_is_404(client: TestClient, make_png: Callable[..., bytes]):
    assert_problem(upload(client, "nope", make_png(0)), 404, "collection_not_found")


def test_upload_rejects_an_empty_file(client: TestClient, collection: str):
    assert_problem(upload(client, collection, b""), 400, "empty_upload")


def test_upload_without_a_file_field_is_422(client: TestClient, collection: str):
    response = client.post(f"{API}/collections/{collection}/images", data={"metadata": "{}"})
    assert_problem(response, 422, "invalid_request")


@pytest.mark.parametrize(
    "data",
    [
        b"hello",
        b"just some text\nover two lines\n",
        b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        np.random.default_rng(7).bytes(4096),
        b"\x89PNG\r\n\x1a\n",  # a PNG signature and nothing else
    ],
    ids=["word", "text", "html", "random", "png-signature-only"],
)
def test_upload_rejects_bytes_that_are_not_an_image(client: TestClient, collection: str, data: bytes):
    assert_problem(upload(client, collection, data), 422, "not_an_image")


def _svg() -> bytes:
    return b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("bmp", lambda: encode(noise(), "BMP")),
        ("tiff", lambda: encode(noise(), "TIFF")),
        ("ico", lambda: encode(noise(), "ICO")),
        ("pdf", lambda: encode(noise(), "PDF")),
        ("eps", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
        ("svg", _svg),
    ],
)
@pytest.mark.parametrize("renamed", [False, True], ids=["own-name", "renamed-png"])
def test_upload_rejects_formats_outside_the_allow_list(
    client: TestClient, collection: str, kind: str, make: Callable[[], bytes], renamed: bool
):
    name, content_type = ("x.png", "image/png") if renamed else (f"x.{kind}", f"image/{kind}")
    body = assert_problem(
        upload(client, collection, make(), name=name, content_type=content_type), 415, "unsupported_format"
    )
    assert "PNG" in body["detail"]  # says what is accepted


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_upload_rejects_truncated_images(client: TestClient, collection: str, image_format: str, keep: float):
    data = encode(noise((96, 96)), image_format)
    response = upload(client, collection, data[: int(len(data) * keep)])
    body = assert_problem(response, 422)
    # A cut inside the header cannot be told from garbage; anywhere later it is "truncated".
    assert body["code"] in ({"image_truncated"} if keep >= 0.5 else {"image_truncated", "not_an_image"})
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert client.get(f"{API}/collections/{collection}").json()["image_count"] == 0


@pytest.mark.timeout(10)
def test_upload_rejects_declared_pixel_bomb_fast(client: TestClient, collection: str):
    started = time.perf_counter()
    response = upload(client, collection, png_header_only(60000, 60000))
    assert time.perf_counter() - started < 1.0
    assert_problem(response, 413, "image_too_large")
    assert client.get(f"{API}/health").status_code == 200


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "data",
    [
        png_header_only(2001, 2001),  # just over our 4 MP cap
        png_header_only(10000, 10000),  # over Pillow's warning level, under its error level
        png_header_only(1, 100000),  # one side over max_side
        gif_screen(65535, 65535),
    ],
    ids=["over-our-cap", "pillow-warning-level", "long-thin", "gif-screen"],
)
def test_upload_rejects_images_over_the_pixel_caps(client: TestClient, collection: str, data: bytes):
    assert_problem(upload(client, collection, data), 413, "image_too_large")


def test_upload_rejects_a_body_over_the_byte_limit(client: TestClient, collection: str, settings: Settings):
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * settings.max_upload_bytes
    assert_problem(upload(client, collection, data), 413, "payload_too_large")


@pytest.mark.parametrize(
    "metadata", ["{not json", "[1, 2]", '"label"', "7", "null", '{"a": 1'], ids=lambda m: m[:8]
)
def test_upload_rejects_metadata_that_is_not_a_json_object(
    client: TestClient, collection: str, make_png: Callable[..., bytes], metadata: str
):
    response = upload(client, collection, make_png(0), metadata=metadata)
    body = assert_problem(response, 422, "invalid_request")
    assert "metadata" in body["detail"]
    assert client.get(f"{API}/collections/{collection}").json()["image_count"] == 0


# -- reading images back ----------------------------------------------------------------------
def test_get_image_returns_its_description(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    created = upload(client, collection, make_png(8), metadata='{"label": "8"}').json()
    response = client.get(f"{API}/images/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created["image"]


def test_get_unknown_image_is_404(client: TestClient):
    assert_problem(client.get(f"{API}/images/999999"), 404, "image_not_found")
    assert_problem(client.get(f"{API}/images/999999/file"), 404, "image_not_found")
    assert_problem(client.get(f"{API}/images/999999/thumbnail"), 404, "image_not_found")


def test_image_id_that_is_not_a_number_is_422(client: TestClient):
    assert_problem(client.get(f"{API}/images/abc"), 422, "invalid_request")


def test_image_file_is_served_byte_exact_with_its_true_type(client: TestClient, collection: str):
    data = encode(noise(), "JPEG", quality=85)
    created = upload(client, collection, data, name="liar.png", content_type="image/png").json()
    response = client.get(f"{API}/images/{created['id']}/file")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "immutable" in response.headers["cache-control"]


def test_thumbnail_of_a_large_image_is_a_small_webp(client: TestClient, collection: str):
    created = upload(client, collection, encode(noise((400, 200)), "PNG")).json()
    response = client.get(f"{API}/images/{created['id']}/thumbnail", params={"size": 128})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["x-content-type-options"] == "nosniff"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (128, 64)
    again = client.get(f"{API}/images/{created['id']}/thumbnail", params={"size": 128})
    assert again.content == response.content  # cached


def test_thumbnail_of_a_small_image_is_the_original(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    data = make_png(9)
    created = upload(client, collection, data).json()
    response = client.get(f"{API}/images/{created['id']}/thumbnail")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png" and response.content == data


@pytest.mark.parametrize("size", [0, 15, 513, "big"])
def test_thumbnail_rejects_sizes_out_of_range(
    client: TestClient, collection: str, make_png: Callable[..., bytes], size: object
):
    created = upload(client, collection, make_png(0)).json()
    response = client.get(f"{API}/images/{created['id']}/thumbnail", params={"size": size})
    assert_problem(response, 422, "invalid_request")


# -- deleting ---------------------------------------------------------------------------------
def test_delete_image_removes_row_file_and_vector(
    client: TestClient, collection: str, make_png: Callable[..., bytes], settings: Settings
):
    data = make_png(10)
    doomed = upload(client, collection, data).json()["id"]
    kept = [upload(client, collection, make_png(seed)).json()["id"] for seed in (11, 12)]

    response = client.delete(f"{API}/images/{doomed}")
    assert response.status_code == 204 and response.content == b""

    assert_problem(client.get(f"{API}/images/{doomed}"), 404, "image_not_found")
    assert_problem(client.get(f"{API}/images/{doomed}/file"), 404, "image_not_found")
    hits = search(client, collection, data).json()["hits"]
    assert sorted(h["id"] for h in hits) == sorted(kept)
    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["embedded_count"] == info["index_size"] == 2
    assert len([p for p in settings.images_dir.rglob("*") if p.is_file()]) == 2


def test_delete_image_keeps_the_file_when_another_collection_holds_the_same_bytes(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    data = make_png(13)
    doomed = upload(client, collection, data).json()["id"]
    kept = upload(client, "other", data).json()["id"]

    assert client.delete(f"{API}/images/{doomed}").status_code == 204

    assert client.get(f"{API}/images/{kept}/file").content == data
    assert [h["id"] for h in search(client, "other", data).json()["hits"]] == [kept]
    assert search(client, collection, data).json()["hits"] == []


def test_deleted_image_can_be_uploaded_again(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    data = make_png(14)
    first = upload(client, collection, data).json()["id"]
    client.delete(f"{API}/images/{first}")
    again = upload(client, collection, data)
    assert again.status_code == 201
    hits = search(client, collection, data).json()["hits"]
    assert [h["id"] for h in hits] == [again.json()["id"]]
    assert client.get(f"{API}/images/{again.json()['id']}/file").content == data


def test_deleted_image_id_is_never_given_to_another_image(
    client: TestClient,
    collection: str,
    make_png: Callable[..., bytes],
):
    # File URLs are served as immutable for a year: a reused id would show caches the wrong image.
    upload(client, collection, make_png(16))
    last = upload(client, collection, make_png(17)).json()["id"]
    client.delete(f"{API}/images/{last}")
    assert upload(client, collection, make_png(18)).json()["id"] != last


def test_delete_unknown_image_is_404(client: TestClient):
    assert_problem(client.delete(f"{API}/images/424242"), 404, "image_not_found")


def test_delete_is_not_repeatable(client: TestClient, collection: str, make_png: Callable[..., bytes]):
    image_id = upload(client, collection, make_png(15)).json()["id"]
    assert client.delete(f"{API}/images/{image_id}").status_code == 204
    assert_problem(client.delete(f"{API}/images/{image_id}"), 404, "image_not_found")
