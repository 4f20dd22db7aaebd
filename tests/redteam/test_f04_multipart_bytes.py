"""Finding 4, the bytes of a multipart body: a ``metadata`` part or a file name whose bytes are not
UTF-8 is refused (422 ``bad_metadata``, ``bad_name``) with nothing stored, never read as Latin-1
and stored as other text. Text that merely looks like Latin-1 (``"ÿ"``, ``"Ã©"``) sent as proper
UTF-8 is stored exactly as sent; a body that declares another charset is read in that charset."""

from __future__ import annotations

from collections.abc import Callable

import fastapi.routing
import httpx
import pytest
from fastapi.params import File, Form
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.api.forms import Utf8FormRoute
from tests.api.helpers import assert_problem
from tests.api.test_imports import make_zip
from tests.redteam.user_text import API, image_count

BOUNDARY = "cbir-test-boundary"


def part(disposition: bytes, data: bytes) -> bytes:
    return (
        b"--"
        + BOUNDARY.encode()
        + b"\r\nContent-Disposition: form-data; "
        + disposition
        + b"\r\n\r\n"
        + data
        + b"\r\n"
    )


def post_raw(client: TestClient, path: str, *parts: bytes, charset: str | None = None) -> httpx.Response:
    """POST a multipart body made of these exact bytes (httpx would encode every name as UTF-8)."""
    body = b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    if charset is not None:
        content_type += f"; charset={charset}"
    return client.post(f"{API}{path}", content=body, headers={"content-type": content_type})


def upload_raw(
    client: TestClient,
    collection: str,
    png: bytes,
    *,
    filename: bytes = b"a.png",
    metadata: bytes | None = None,
    charset: str | None = None,
) -> httpx.Response:
    parts = [part(b'name="file"; filename="' + filename + b'"', png)]
    if metadata is not None:
        parts.append(part(b'name="metadata"', metadata))
    return post_raw(client, f"/collections/{collection}/images", *parts, charset=charset)


@pytest.mark.parametrize(
    ("metadata", "offset"),
    [
        (b'{"a":"\xff"}', 6),  # Latin-1's y-umlaut, not UTF-8
        (b'{"caf\xe9": 1}', 5),  # in a key
        (b'{"a":"\xed\xa0\x80"}', 6),  # a surrogate written as UTF-8 bytes
        (b'{"a":"x\xc3"}', 7),  # a sequence cut short
        (b'{"a": 1}\xfe', 8),  # outside any string
    ],
)
def test_upload_whose_metadata_bytes_are_not_utf8_is_refused_and_stores_nothing(
    client: TestClient, collection: str, make_png: Callable[..., bytes], metadata: bytes, offset: int
) -> None:
    body = assert_problem(upload_raw(client, collection, make_png(1), metadata=metadata), 422, "bad_metadata")
    assert "not UTF-8" in body["detail"] and f"offset {offset}" in body["detail"], body
    assert image_count(client, collection) == 0


@pytest.mark.parametrize("filename", [b"a\xed\xa0\x80.png", b"caf\xe9.png", b"\xff.png"])
def test_upload_whose_file_name_bytes_are_not_utf8_is_refused_and_stores_nothing(
    client: TestClient, collection: str, make_png: Callable[..., bytes], filename: bytes
) -> None:
    body = assert_problem(upload_raw(client, collection, make_png(1), filename=filename), 422, "bad_name")
    assert "not UTF-8" in body["detail"], body
    assert image_count(client, collection) == 0


def test_text_that_looks_like_latin1_sent_as_utf8_is_stored_as_sent(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    # Every character here is in U+0000-U+00FF: only the bytes tell these apart from Latin-1.
    note, name = "ÿ é Ã© Â½", "café-Ã©.png"
    response = upload_raw(
        client,
        collection,
        make_png(1),
        filename=name.encode("utf-8"),
        metadata=('{"note": "' + note + '"}').encode("utf-8"),
    )
    assert response.status_code == 201, response.text
    image = response.json()["image"]
    assert (image["metadata"], image["original_name"]) == ({"note": note}, name)


def test_a_body_that_declares_latin1_is_read_as_latin1(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    response = upload_raw(
        client,
        collection,
        make_png(1),
        filename=b"caf\xe9.png",
        metadata=b'{"a":"\xff"}',
        charset="iso-8859-1",
    )
    assert response.status_code == 201, response.text
    image = response.json()["image"]
    assert (image["metadata"], image["original_name"]) == ({"a": "ÿ"}, "café.png")


def test_a_body_that_declares_an_unknown_charset_is_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    response = upload_raw(
        client, collection, make_png(1), metadata=b'{"a":"\xff"}', charset="no-such-charset"
    )
    assert "no-such-charset" in assert_problem(response, 400, "bad_multipart")["detail"]
    assert image_count(client, collection) == 0


def test_an_archive_whose_file_name_bytes_are_not_utf8_is_refused_and_starts_no_job(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    archive = make_zip({"cat/a.png": make_png(1)})
    response = post_raw(
        client, f"/collections/{collection}/imports", part(b'name="file"; filename="photos\xff.zip"', archive)
    )
    assert "not UTF-8" in assert_problem(response, 422, "bad_name")["detail"]
    assert client.get(f"{API}/jobs").json()["jobs"] == []


def test_every_route_that_reads_a_form_reads_its_bytes_as_utf8(client: TestClient) -> None:
    """A new route taking a file or a form field must use the route class that decodes strictly."""
    routes = [
        getattr(entry, "original_route", entry)
        for entry in fastapi.routing.iter_route_contexts(client.app.routes)  # type: ignore[attr-defined]
    ]
    with_forms = {
        route.path: route
        for route in routes
        if isinstance(route, APIRoute)
        and (
            any(isinstance(f.field_info, File | Form) for f in route.dependant.body_params)
            or route.path.endswith("/imports")  # reads its multipart body itself
        )
    }
    assert len(with_forms) >= 4, list(with_forms)
    assert [path for path, route in with_forms.items() if not isinstance(route, Utf8FormRoute)] == []
