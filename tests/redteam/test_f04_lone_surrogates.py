"""Finding 4: text that is not UTF-8 (a lone surrogate, a NUL) is refused before anything is
stored, in metadata, labels, manifest rows and archive member names; a row stored with one before
the check existed is served with replacement characters, never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from tests.api.helpers import assert_problem, job_report
from tests.api.test_imports import start_archive_import, wait_for_job
from tests.redteam.user_text import (
    API,
    assert_reads_work,
    image_count,
    manifest_import,
    restarted,
    seeded,
    store_raw_metadata,
    tar_with_raw_names,
    upload,
    zip_with_raw_name,
)

NOT_UTF8 = [
    '{"a": "\\ud800"}',  # a lone high surrogate
    '{"a": "x\\udfffy"}',  # a lone low surrogate
    '{"\\udc00": 1}',  # in a key
    '{"label": "\\ud800"}',
    '{"tags": ["ok", "\\ud800"]}',
    '{"deep": {"\\ud800key": "v"}}',
    '{"a": "x\\u0000y"}',  # a NUL: PostgreSQL cannot extract it as text
]


@pytest.mark.parametrize("metadata", NOT_UTF8)
def test_upload_with_text_that_is_not_utf8_is_refused_and_stores_nothing(
    client: TestClient, collection: str, make_png: Callable[..., bytes], metadata: str
) -> None:
    ids = seeded(client, collection, make_png)
    assert_problem(upload(client, collection, make_png(50), metadata), 422, "bad_metadata")
    assert image_count(client, collection) == len(ids)
    assert_reads_work(client, collection, image_id=ids[0], query=make_png(50))


def test_a_surrogate_pair_is_one_character_and_is_stored(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    response = upload(client, collection, make_png(1), '{"label": "\\ud83d\\ude00", "note": "caf\\u00e9"}')
    assert response.status_code == 201, response.text
    assert response.json()["image"]["metadata"] == {"label": "\U0001f600", "note": "café"}


def test_manifest_rows_with_lone_surrogates_are_rejected_and_the_others_added(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    files = {f"shots/{i}.png": make_png(100 + i) for i in range(5)}
    job = manifest_import(
        client,
        collection,
        files=files,
        rows=[
            '{"path": "shots/0.png", "label": "5"}',
            '{"path": "shots/1.png", "a": "\\ud800"}',
            '{"path": "shots/2.png", "label": "\\udc00"}',
            '{"path": "shots/3.png", "metadata": {"\\ud800": "key"}}',
            '{"path": "shots/4.png", "label": "6"}',
        ],
    )
    assert job["state"] == "succeeded", job
    assert (job["added"], job["failed"]) == (2, 3), job
    rejected = {item: code for item, (status, code) in job["report"].items() if status == "rejected"}
    assert rejected == {"row 2": "bad_metadata", "row 3": "bad_metadata", "row 4": "bad_metadata"}
    browse = client.get(f"{API}/collections/{collection}/images")
    assert browse.status_code == 200, browse.text
    assert sorted(row["original_name"] for row in browse.json()) == ["shots/0.png", "shots/4.png"]


def test_archive_members_whose_names_are_not_utf8_are_rejected_and_the_others_added(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    archive = tar_with_raw_names(
        {
            b"cat/good.png": make_png(1),
            b"cat/bad\xff.png": make_png(2),  # not UTF-8: Python reads it as a lone surrogate
            b"\xed\xa0\x80/x.png": make_png(3),  # a surrogate encoded as UTF-8 bytes, as a label
            b"dog/fine.png": make_png(4),
        }
    )
    response = start_archive_import(client, collection, archive, "photos.tar")
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert job["state"] == "succeeded", job
    assert (job["added"], job["failed"]) == (2, 2), job
    assert client.get(f"{API}/jobs/{job['id']}").status_code == 200
    report = job_report(client, job)
    codes = sorted(code for status, code in report.values() if status == "rejected")
    assert codes == ["bad_name", "bad_name"]
    json.dumps(report, ensure_ascii=False).encode("utf-8")  # every item name in it is UTF-8
    browse = client.get(f"{API}/collections/{collection}/images")
    assert browse.status_code == 200, browse.text
    assert sorted(row["original_name"] for row in browse.json()) == ["cat/good.png", "dog/fine.png"]


def test_a_zip_member_name_flagged_utf8_that_is_not_is_a_damaged_archive(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    archive = zip_with_raw_name(make_png(1), make_png(2), raw=b"bad\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8")
    response = start_archive_import(client, collection, archive, "photos.zip")
    assert "photos.zip" in assert_problem(response, 422, "bad_archive")["detail"]
    assert image_count(client, collection) == 0
    assert client.get(f"{API}/jobs").json()["jobs"] == []


def test_a_surrogate_row_stored_before_the_check_is_served_with_replacement_characters(
    client: TestClient, collection: str, settings: Settings, make_png: Callable[..., bytes]
) -> None:
    ids = seeded(client, collection, make_png)
    # What an upload of {"label": "\ud800x"} stored before (the 500 came after the commit).
    store_raw_metadata(client, ids[1], '{"label": "\\ud800x", "a": ["\\udc00"], "\\ud801": "k"}')
    with restarted(settings) as again:
        assert_reads_work(again, collection, image_id=ids[0], query=make_png(1))
        image = again.get(f"{API}/images/{ids[1]}")
        assert image.status_code == 200, image.text
        assert image.json()["metadata"] == {"label": "\ufffdx", "a": ["\ufffd"], "\ufffd": "k"}
        hits = again.get(f"{API}/collections/{collection}/images/{ids[0]}/similar", params={"k": 3})
        assert hits.status_code == 200, hits.text
        assert ids[1] in [hit["id"] for hit in hits.json()["hits"]]
        labels = again.get(f"{API}/collections/{collection}/labels").json()["labels"]
        assert {row["label"]: row["count"] for row in labels} == {"5": 1, "\ufffdx": 1, "6": 1}
