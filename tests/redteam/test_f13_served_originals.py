"""Finding 13: a valid image with HTML appended was stored and served back byte for byte.

Now what follows an image's end is not stored (nor hashed: the same image with other trailing
bytes is a duplicate), and originals and thumbnails are served with a sandboxing
Content-Security-Policy; ``?download=1`` serves them as an attachment with a safe file name.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.imaging.image_end import strip_trailing
from tests.api.test_imports import run_import
from tests.conftest import encode

API = "/api/v1"
CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "decode"
HTML = b"<html><body><script>alert(document.cookie)</script></body></html>\n"


def picture(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def jpeg_with_exif_thumbnail(seed: int = 0) -> bytes:
    """A JPEG whose APP1 segment holds a whole JPEG thumbnail: its FFD9 comes first in the file,
    so only a walk of the marker structure finds the image's real end."""
    main, thumb = encode(picture(seed, (64, 48)), "JPEG"), encode(picture(seed + 1, (16, 12)), "JPEG")
    payload = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00" + thumb
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return main[:2] + app1 + main[2:]


IMAGES: dict[str, Callable[[], bytes]] = {
    "gif": lambda: encode(picture(1).convert("P"), "GIF"),
    "png": lambda: encode(picture(2), "PNG"),
    "jpeg": lambda: jpeg_with_exif_thumbnail(3),
    "webp": lambda: encode(picture(4), "WEBP"),
    # Its second picture follows the first one's end, listed in the MP index: it is kept.
    "mpo": lambda: (CORPUS / "11-mpo-2-pictures").read_bytes(),
}
MEDIA = {
    "gif": "image/gif",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "mpo": "image/jpeg",
}


def upload(client: TestClient, collection: str, data: bytes, name: str = "x.gif") -> dict:
    response = client.post(f"{API}/collections/{collection}/images", files={"file": (name, data)})
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def assert_sandboxed(response) -> None:
    csp = response.headers["content-security-policy"]
    directives = {d.strip().split(" ")[0] for d in csp.split(";")}
    assert "sandbox" in directives and "default-src 'none'" in csp, csp
    assert "script-src" not in directives
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_bytes_after_the_image_end_are_not_stored_or_served(client: TestClient, collection: str, kind: str):
    clean = IMAGES[kind]()
    body = upload(client, collection, clean + HTML, name=f"polyglot.{kind}")
    assert body["created"] is True
    image = body["image"]
    assert image["sha256"] == hashlib.sha256(clean).hexdigest()
    assert image["byte_size"] == len(clean)

    served = client.get(f"{API}/images/{body['id']}/file")
    assert served.status_code == 200
    assert served.content == clean
    assert served.headers["content-type"] == MEDIA[kind]
    assert_sandboxed(served)


def test_gif_without_a_trailer_is_cut_where_the_junk_begins(client: TestClient, collection: str):
    clean = IMAGES["gif"]()
    assert clean.endswith(b";")
    body = upload(client, collection, clean[:-1] + HTML)
    served = client.get(f"{API}/images/{body['id']}/file")
    assert served.content == clean  # the blocks, then the trailer it lacked
    assert HTML not in served.content


def test_same_image_with_other_trailing_bytes_is_a_duplicate(client: TestClient, collection: str):
    clean = IMAGES["gif"]()
    first = upload(client, collection, clean + HTML)
    for variant in (clean, clean + b"another tail", clean + HTML):
        again = upload(client, collection, variant)
        assert again["created"] is False and again["id"] == first["id"], variant[-12:]
    assert client.get(f"{API}/collections/{collection}").json()["image_count"] == 1


def test_archive_import_strips_the_tail_and_deduplicates_with_uploads(client: TestClient, collection: str):
    png, jpeg = IMAGES["png"](), IMAGES["jpeg"]()
    uploaded = upload(client, collection, png, name="a.png")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tail.png", png + HTML)
        zf.writestr("photo.jpg", jpeg + HTML)
    job = run_import(client, collection, archive.getvalue())
    assert job["state"] == "succeeded", job
    assert (job["added"], job["duplicates"], job["failed"]) == (1, 1, 0), job
    listing = client.get(f"{API}/collections/{collection}/images", params={"limit": 10}).json()
    items = listing["items"] if isinstance(listing, dict) else listing
    shas = {item["sha256"] for item in items}
    assert shas == {hashlib.sha256(png).hexdigest(), hashlib.sha256(jpeg).hexdigest()}
    for item in items:
        content = client.get(f"{API}/images/{item['id']}/file").content
        assert HTML not in content and content in (png, jpeg)
    assert uploaded["id"] in {item["id"] for item in items}


def test_thumbnails_are_sandboxed_too(client: TestClient, collection: str):
    small = upload(client, collection, IMAGES["png"]())  # 40x30: the original is its own thumbnail
    large = upload(client, collection, encode(picture(9, (300, 200)), "PNG"))
    for image_id in (small["id"], large["id"]):
        response = client.get(f"{API}/images/{image_id}/thumbnail", params={"size": 64})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("image/")
        assert_sandboxed(response)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("evil.html", "evil.gif"),
        ("../../a b;c\\d.gif", "d.gif"),
        ("../../a b;c.gif", "a_b_c.gif"),
        ("фото.gif", "image-{id}.gif"),
        (".gif", "image-{id}.gif"),
    ],
)
def test_download_is_an_attachment_with_a_safe_name(
    client: TestClient, collection: str, name: str, expected: str
):
    gif = IMAGES["gif"]()
    response = client.post(f"{API}/collections/{collection}/images", files={"file": (name, gif)})
    assert response.status_code == 201, response.text
    image_id = response.json()["id"]
    download = client.get(f"{API}/images/{image_id}/file", params={"download": 1})
    assert download.status_code == 200 and download.content == gif
    assert download.headers["content-disposition"] == f'attachment; filename="{expected.format(id=image_id)}"'
    assert_sandboxed(download)
    inline = client.get(f"{API}/images/{image_id}/file")
    assert "content-disposition" not in inline.headers


def test_files_without_trailing_bytes_are_kept_as_they_are():
    """Valid, truncated and malformed files of the decode corpus: the walk leaves each unchanged
    (a truncated file keeps its own error code: image_truncated)."""
    for path in sorted(CORPUS.iterdir()):
        data = path.read_bytes()
        assert strip_trailing(data) is data, path.name
