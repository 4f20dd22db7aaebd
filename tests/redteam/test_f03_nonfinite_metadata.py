"""Finding 3: NaN and Infinity in metadata are refused on every path, and a row stored with one
before the check existed no longer breaks labels, filters and searches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from tests.api.helpers import assert_problem
from tests.conftest import ON_POSTGRES
from tests.redteam.user_text import (
    API,
    assert_reads_work,
    image_count,
    manifest_import,
    restarted,
    seeded,
    store_raw_metadata,
    upload,
)

NON_FINITE = [
    '{"note": NaN}',
    '{"note": Infinity}',
    '{"note": -Infinity}',
    '{"note": 1e999}',  # parses to infinity
    '{"label": "5", "scores": [0.5, NaN]}',
    '{"deep": {"er": {"note": NaN}}}',
]


@pytest.mark.parametrize("metadata", NON_FINITE)
def test_upload_with_non_finite_metadata_is_refused_and_stores_nothing(
    client: TestClient, collection: str, make_png: Callable[..., bytes], metadata: str
) -> None:
    ids = seeded(client, collection, make_png)
    body = assert_problem(upload(client, collection, make_png(50), metadata), 422, "bad_metadata")
    assert "finite" in body["detail"] or "NaN" in body["detail"], body
    assert image_count(client, collection) == len(ids)
    assert_reads_work(client, collection, image_id=ids[0], query=make_png(0))


def test_finite_numbers_are_stored_as_given(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    response = upload(client, collection, make_png(1), '{"x": 1.5, "y": -2e-3, "n": 0}')
    assert response.status_code == 201, response.text
    assert response.json()["image"]["metadata"] == {"x": 1.5, "y": -2e-3, "n": 0}


def test_manifest_rows_with_non_finite_numbers_are_rejected_and_the_others_added(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    files = {f"shots/{i}.png": make_png(100 + i) for i in range(5)}
    job = manifest_import(
        client,
        collection,
        files=files,
        rows=[
            '{"path": "shots/0.png", "label": "5", "split": "train"}',
            '{"path": "shots/1.png", "label": "5", "note": NaN}',
            '{"path": "shots/2.png", "metadata": {"w": Infinity}}',
            '{"path": "shots/3.png", "label": 1e999}',
            '{"path": "shots/4.png", "label": "6"}',
        ],
    )
    assert job["state"] == "succeeded", job
    assert (job["added"], job["failed"]) == (2, 3), job
    rejected = {item: code for item, (status, code) in job["report"].items() if status == "rejected"}
    assert rejected == {"row 2": "bad_metadata", "row 3": "bad_metadata", "row 4": "bad_metadata"}
    (first,) = [row["id"] for row in client.get(f"{API}/collections/{collection}/images").json()[:1]]
    assert_reads_work(client, collection, image_id=first, query=files["shots/0.png"])


@pytest.mark.skipif(ON_POSTGRES, reason="PostgreSQL's json type cannot hold NaN: no such row exists there")
def test_a_nan_row_stored_before_the_check_does_not_break_reads(
    client: TestClient, collection: str, settings: Settings, make_png: Callable[..., bytes]
) -> None:
    ids = seeded(client, collection, make_png)
    # What an upload of {"note": NaN} stored before: JSON text no SQL JSON function accepts.
    store_raw_metadata(client, ids[1], '{"label": "5", "note": NaN, "w": [Infinity, -Infinity]}')
    with restarted(settings) as again:
        assert_reads_work(again, collection, image_id=ids[1], query=make_png(1))
        image = again.get(f"{API}/images/{ids[1]}").json()
        assert image["metadata"] == {"label": "5", "note": None, "w": [None, None]}
        labels = again.get(f"{API}/collections/{collection}/labels").json()["labels"]
        assert {row["label"]: row["count"] for row in labels} == {"5": 2, "6": 1}
        hits = again.get(f"{API}/collections/{collection}/images", params={"label": "5"}).json()
        assert sorted(row["id"] for row in hits) == ids[:2]
