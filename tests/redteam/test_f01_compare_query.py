"""Finding 1, the compare route: a query image without features is a 422 there too, never NaN
scores or a 500, and its decode is held to the decode memory budget like a search's."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image

from tests.api.helpers import assert_problem

API = "/api/v1"


def black_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (16, 16), 0).save(out, format="PNG")
    return out.getvalue()


def test_compare_with_a_black_query_is_degenerate_image(client: TestClient, make_png) -> None:
    assert client.post(f"{API}/collections", json={"name": "c", "embedder": "tiny"}).status_code == 201
    for seed in range(3):
        assert client.post(
            f"{API}/collections/c/images", files={"file": ("a.png", make_png(seed))}
        ).is_success
    response = client.post(
        f"{API}/collections/c/compare",
        params={"against": "pixels", "sample": 3},
        files={"file": ("b.png", black_png())},
    )
    assert_problem(response, 422, "degenerate_image")
    fine = client.post(
        f"{API}/collections/c/compare",
        params={"against": "pixels", "sample": 3},
        files={"file": ("a.png", make_png(1))},
    )
    assert fine.status_code == 200, fine.text
