"""Finding 1, the compare route: a query image without features is a 422 there too, never NaN
scores or a 500, and its decode is held to the decode memory budget like a search's."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from app.context import open_context
from app.data.records import EmbeddingRecord
from app.main import create_app
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


def test_compare_with_a_stored_row_its_index_set_aside_is_degenerate_image(settings, make_png) -> None:
    """A stored vector of another dimension (a restored backup): the index sets it aside at start,
    and comparing with that image is a 422, not a matmul error."""
    with TestClient(create_app(settings)) as client:
        assert client.post(f"{API}/collections", json={"name": "c", "embedder": "tiny"}).status_code == 201
        ids = [
            client.post(f"{API}/collections/c/images", files={"file": ("a.png", make_png(seed))}).json()["id"]
            for seed in range(3)
        ]
    ctx = open_context(settings)
    try:
        with ctx.db.session() as session:
            row = session.scalars(select(EmbeddingRecord).where(EmbeddingRecord.image_id == ids[0])).one()
            short = np.zeros(32, dtype="<f4")
            short[0] = 1.0  # unit norm: only its dimension is wrong
            row.vector, row.dim = short.tobytes(), 32
            session.commit()
    finally:
        ctx.close()
    for path in (settings.data_dir / "indexes").glob("*.cbidx"):
        path.unlink()  # as after a restore: the index is built from the database
    with TestClient(create_app(settings)) as client:
        params = {"against": "pixels", "sample": 3}
        response = client.get(f"{API}/collections/c/images/{ids[0]}/compare", params=params)
        assert_problem(response, 422, "degenerate_image")
        fine = client.get(f"{API}/collections/c/images/{ids[1]}/compare", params=params)
        assert fine.status_code == 200, fine.text
