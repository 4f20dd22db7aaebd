"""Finding 4, manifests that cannot be read as a whole (bytes that are not UTF-8, no path column):
inside an archive, the manifest is the job's one report line (``bad_manifest``, naming it and the
byte's offset) and the job fails with that error, importing nothing: its rows choose the members
and their labels, so an import without it would store what the user meant to leave out, under
labels the user meant to replace (and a second import could not fix them: the same bytes are
never stored twice). Uploaded beside the archive, it is a 422 ``bad_manifest`` naming the file the
user sent, and nothing is kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from tests.api.helpers import assert_problem, job_report
from tests.api.test_imports import make_tar, make_zip, start_archive_import, wait_for_job
from tests.redteam.user_text import API, image_count

LATIN1 = "path,label\nshots/0.png,ch\xe2t\n".encode("latin-1")  # 0xE2 is byte 25 (line 2)
NO_PATH = b"name,label\nshots/0.png,cat\n"


def photos(make_png: Callable[..., bytes]) -> dict[str, bytes]:
    return {f"shots/{i}.png": make_png(100 + i) for i in range(3)}


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_a_manifest_inside_the_archive_that_is_not_utf8_is_reported_and_fails_the_job(
    client: TestClient, collection: str, settings: Settings, make_png: Callable[..., bytes], kind: str
) -> None:
    members = {**photos(make_png), "manifest.csv": LATIN1}
    archive = (
        make_zip(members) if kind == "zip" else make_tar(members, mode="w:gz" if kind == "tar.gz" else "w")
    )
    response = start_archive_import(client, collection, archive, f"photos.{kind}")
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert job["state"] == "failed", job
    assert job["error"].startswith("bad_manifest: "), job
    assert "'manifest.csv'" in job["error"] and "not UTF-8" in job["error"] and "offset 25" in job["error"], (
        job
    )
    assert (job["total"], job["done"], job["added"], job["failed"]) == (1, 1, 0, 1), job
    assert job_report(client, job) == {"manifest.csv": ("rejected", "bad_manifest")}
    (error,) = job["errors"]
    assert (error["item"], error["code"]) == ("manifest.csv", "bad_manifest") and "offset 25" in error[
        "detail"
    ]
    assert image_count(client, collection) == 0
    assert list(settings.uploads_dir.iterdir()) == []


def test_a_manifest_inside_the_archive_without_a_path_column_is_reported_the_same_way(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    archive = make_zip({**photos(make_png), "manifest.csv": NO_PATH})
    job = wait_for_job(client, start_archive_import(client, collection, archive).json()["job_id"])
    assert job["state"] == "failed" and job["error"].startswith("bad_manifest: "), job
    assert "'manifest.csv'" in job["error"] and "path" in job["error"], job
    assert job_report(client, job) == {"manifest.csv": ("rejected", "bad_manifest")}
    assert image_count(client, collection) == 0


@pytest.mark.parametrize(("manifest", "where"), [(LATIN1, "offset 25"), (NO_PATH, "path")])
def test_an_unreadable_manifest_uploaded_beside_the_archive_names_the_file_sent(
    client: TestClient,
    collection: str,
    settings: Settings,
    make_png: Callable[..., bytes],
    manifest: bytes,
    where: str,
) -> None:
    response = client.post(
        f"{API}/collections/{collection}/imports",
        files={"file": ("photos.zip", make_zip(photos(make_png))), "manifest": ("labels.csv", manifest)},
    )
    detail = assert_problem(response, 422, "bad_manifest")["detail"]
    assert "'labels.csv'" in detail and where in detail, detail
    assert ".manifest" not in detail and "import-" not in detail, detail  # never the temporary file
    assert list(settings.uploads_dir.iterdir()) == []
    assert list(Path(settings.tmp_dir).iterdir()) == []
    assert client.get(f"{API}/jobs").json()["jobs"] == []
