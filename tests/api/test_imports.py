"""Bulk imports: archives and built-in datasets run as jobs with exact per-item accounting."""

from __future__ import annotations

import io
import tarfile
import time
import zipfile
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import assert_problem

API = "/api/v1"
PROBLEM = "application/problem+json"


def make_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return out.getvalue()


def make_tar(members: dict[str, bytes], *, mode: str = "w", links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return out.getvalue()


def start_archive_import(
    client: TestClient, collection: str, data: bytes, name: str = "images.zip"
) -> httpx.Response:
    return client.post(
        f"{API}/collections/{collection}/imports",
        files={"file": (name, data, "application/octet-stream")},
    )


def wait_for_job(client: TestClient, job_id: str, *, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"{API}/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["state"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job still {job['state']} after {timeout} s: {job}"
        time.sleep(0.05)


def run_import(client: TestClient, collection: str, data: bytes, name: str = "images.zip") -> dict:
    response = start_archive_import(client, collection, data, name)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"])


def counts(job: dict) -> tuple[int, int, int, int]:
    return job["done"], job["added"], job["duplicates"], job["failed"]


@pytest.fixture
def labelled(make_png: Callable[..., bytes]) -> dict[str, bytes]:
    """Six good PNGs in two label folders."""
    return {
        f"{label}/{i}.png": make_png(10 * i + n) for n, label in enumerate(("cat", "dog")) for i in range(3)
    }


# -- archives ---------------------------------------------------------------------------------
def test_zip_import_is_accepted_as_a_job(client: TestClient, collection: str, labelled: dict[str, bytes]):
    response = start_archive_import(client, collection, make_zip(labelled))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "queued"
    assert body["status_url"] == f"{API}/jobs/{body['job_id']}"
    job = wait_for_job(client, body["job_id"])
    assert job["state"] == "succeeded", job
    assert job["kind"] == "import" and job["collection"] == collection
    assert job["params"] == {"source": "archive", "filename": "images.zip"}
    assert counts(job) == (6, 6, 0, 0) and job["total"] == 6
    assert job["errors"] == [] and job["error"] is None
    assert job["started_at"] is not None and job["finished_at"] is not None


def test_imported_images_are_labelled_by_their_folder_and_searchable(
    client: TestClient, collection: str, labelled: dict[str, bytes]
):
    run_import(client, collection, make_zip(labelled))
    images = client.get(f"{API}/collections/{collection}/images").json()
    assert sorted((i["original_name"], i["metadata"]["label"]) for i in images) == sorted(
        (name, name.split("/")[0]) for name in labelled
    )
    for name, data in labelled.items():
        hits = client.post(
            f"{API}/collections/{collection}/search", params={"k": 1}, files={"file": ("q.png", data)}
        ).json()["hits"]
        assert hits[0]["original_name"] == name and hits[0]["score"] >= 0.999
        assert hits[0]["label"] == name.split("/")[0]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2"])
def test_tar_imports_work_compressed_or_not(
    client: TestClient, collection: str, labelled: dict[str, bytes], mode: str
):
    job = run_import(client, collection, make_tar(labelled, mode=mode), name="images.tar")
    assert job["state"] == "succeeded" and counts(job) == (6, 6, 0, 0)


def test_tar_made_from_the_current_folder_imports_every_member(
    client: TestClient, collection: str, labelled: dict[str, bytes]
):
    # `tar -C photos -cf photos.tar .` names every member "./label/file.png".
    job = run_import(client, collection, make_tar({f"./{n}": d for n, d in labelled.items()}), "dot.tar")
    assert job["state"] == "succeeded" and counts(job) == (6, 6, 0, 0), job
    labels = {i["metadata"]["label"] for i in client.get(f"{API}/collections/{collection}/images").json()}
    assert labels == {"cat", "dog"}


def test_corrupt_member_is_reported_per_item_and_the_rest_imported(
    client: TestClient, collection: str, labelled: dict[str, bytes]
):
    members = dict(labelled)
    members["cat/broken.png"] = b"this is not a png"
    members["dog/cut.png"] = labelled["dog/0.png"][:40] + b"\x00" * 4
    job = run_import(client, collection, make_zip(members))
    assert job["state"] == "succeeded", job
    assert counts(job) == (8, 6, 0, 2) and job["total"] == 8
    errors = {e["item"]: e["code"] for e in job["errors"]}
    assert errors == {"cat/broken.png": "not_an_image", "dog/cut.png": errors["dog/cut.png"]}
    assert errors["dog/cut.png"] in ("image_truncated", "not_an_image")
    assert all(e["detail"] for e in job["errors"])
    assert client.get(f"{API}/collections/{collection}").json()["image_count"] == 6


def test_reimporting_the_same_archive_adds_nothing(
    client: TestClient, collection: str, labelled: dict[str, bytes]
):
    members = dict(labelled, **{"cat/broken.png": b"garbage"})
    archive = make_zip(members)
    first = run_import(client, collection, archive)
    again = run_import(client, collection, archive)
    assert counts(first) == (7, 6, 0, 1)
    assert counts(again) == (7, 0, 6, 1)
    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["index_size"] == 6


def test_repeated_bytes_inside_one_archive_are_stored_once(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    data = make_png(1)
    job = run_import(client, collection, make_zip({"a/1.png": data, "b/1.png": data, "c/2.png": make_png(2)}))
    assert counts(job) == (3, 2, 1, 0)
    assert client.get(f"{API}/collections/{collection}").json()["index_size"] == 2


@pytest.mark.parametrize("bad_name", ["../evil.png", "cat/../../evil.png", "/abs/evil.png"])
def test_zip_member_leaving_the_archive_is_rejected_per_item(
    client: TestClient, collection: str, labelled: dict[str, bytes], bad_name: str, settings: Settings
):
    members = dict(labelled, **{bad_name: labelled["cat/0.png"] + b"\x00"})
    job = run_import(client, collection, make_zip(members))
    assert job["state"] == "succeeded"
    assert counts(job) == (7, 6, 0, 1), job
    assert job["errors"] == [{"item": bad_name, "code": "unsafe_path", "detail": job["errors"][0]["detail"]}]
    assert not list(settings.data_dir.parent.rglob("evil.png"))


def test_tar_member_leaving_the_archive_is_rejected_per_item(
    client: TestClient, collection: str, labelled: dict[str, bytes]
):
    members = dict(labelled, **{"../evil.png": labelled["cat/0.png"] + b"\x00"})
    job = run_import(client, collection, make_tar(members), name="images.tar")
    assert counts(job) == (7, 6, 0, 1), job
    assert [(e["item"], e["code"]) for e in job["errors"]] == [("../evil.png", "unsafe_path")]


def test_tar_symlink_member_is_rejected_per_item(
    client: TestClient, collection: str, labelled: dict[str, bytes]
):
    archive = make_tar(labelled, links={"cat/passwd.png": "/etc/passwd", "dog/up.png": "../../x.png"})
    job = run_import(client, collection, archive, name="images.tar")
    assert job["state"] == "succeeded"
    assert counts(job) == (8, 6, 0, 2), job
    assert sorted((e["item"], e["code"]) for e in job["errors"]) == [
        ("cat/passwd.png", "unsupported_member_type"),
        ("dog/up.png", "unsupported_member_type"),
    ]


def test_member_over_the_upload_limit_is_rejected_per_item(
    client: TestClient, collection: str, labelled: dict[str, bytes], settings: Settings
):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in labelled.items():
            archive.writestr(name, data)
        archive.writestr("cat/huge.png", b"\0" * (settings.max_upload_bytes + 1))
    job = run_import(client, collection, out.getvalue())
    assert counts(job) == (7, 6, 0, 1), job
    assert [(e["item"], e["code"]) for e in job["errors"]] == [("cat/huge.png", "member_too_large")]


def test_hidden_files_and_macos_forks_are_skipped(
    client: TestClient, collection: str, labelled: dict[str, bytes]
):
    members = dict(labelled, **{"__MACOSX/cat/._0.png": b"fork", "cat/.DS_Store": b"junk"})
    job = run_import(client, collection, make_zip(members))
    assert counts(job) == (6, 6, 0, 0) and job["total"] == 6


def test_archive_file_is_deleted_when_the_job_ends(
    client: TestClient, collection: str, labelled: dict[str, bytes], settings: Settings
):
    run_import(client, collection, make_zip(labelled))
    assert list(settings.tmp_dir.iterdir()) == []


def test_upload_that_is_not_an_archive_is_415(
    client: TestClient, collection: str, make_png: Callable[..., bytes], settings: Settings
):
    for data in (b"just text", make_png(0), np.random.default_rng(3).bytes(2048)):
        assert_problem(start_archive_import(client, collection, data), 415, "unsupported_archive")
    assert list(settings.tmp_dir.iterdir()) == []


def test_empty_archive_upload_is_400(client: TestClient, collection: str):
    assert_problem(start_archive_import(client, collection, b""), 400, "empty_upload")


def test_multipart_without_a_file_is_422(client: TestClient, collection: str):
    response = client.post(
        f"{API}/collections/{collection}/imports", files={"archive": ("a.zip", b"PK")}, data={"x": "1"}
    )
    assert_problem(response, 422, "invalid_request")


def test_multipart_with_two_files_is_400(client: TestClient, collection: str, labelled: dict[str, bytes]):
    archive = make_zip(labelled)
    response = client.post(
        f"{API}/collections/{collection}/imports",
        files=[("file", ("a.zip", archive)), ("file", ("b.zip", archive))],
    )
    assert response.status_code == 400 and response.headers["content-type"] == PROBLEM


def test_archive_over_the_byte_limit_is_413_and_leaves_no_temp_file(
    settings: Settings, labelled: dict[str, bytes]
):
    small = settings.model_copy(update={"max_archive_bytes": 1024})
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
        response = start_archive_import(client, "shapes", make_zip(labelled))
        assert_problem(response, 413, "payload_too_large")
    assert list(settings.tmp_dir.iterdir()) == []


def test_import_with_another_content_type_is_415(client: TestClient, collection: str):
    response = client.post(
        f"{API}/collections/{collection}/imports", content=b"x", headers={"content-type": "text/plain"}
    )
    assert_problem(response, 415, "unsupported_archive")


def test_import_into_unknown_collection_is_404(client: TestClient, labelled: dict[str, bytes]):
    assert_problem(start_archive_import(client, "nope", make_zip(labelled)), 404, "collection_not_found")
    response = client.post(f"{API}/collections/nope/imports", json={"dataset": "mnist", "split": "test"})
    assert_problem(response, 404, "collection_not_found")


def test_unknown_job_is_404(client: TestClient):
    assert_problem(client.get(f"{API}/jobs/0123456789abcdef"), 404, "job_not_found")


# -- datasets ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"dataset": "imagenet", "split": "test"},
        {"dataset": "mnist", "split": "validation"},
        {"split": "test"},
        {"dataset": 3},
    ],
)
def test_bad_dataset_request_is_422(client: TestClient, collection: str, body: dict):
    response = client.post(f"{API}/collections/{collection}/imports", json=body)
    assert_problem(response, 422, "invalid_request")


def test_dataset_request_that_is_not_json_is_422(client: TestClient, collection: str):
    response = client.post(
        f"{API}/collections/{collection}/imports",
        content=b'{"dataset": ',
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 422, "invalid_request")


@pytest.mark.timeout(120)
def test_mnist_test_import_stores_every_digit_with_its_label(client: TestClient, collection: str):
    response = client.post(
        f"{API}/collections/{collection}/imports", json={"dataset": "mnist", "split": "test"}
    )
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"], timeout=110)
    assert job["state"] == "succeeded", job
    assert job["params"] == {"source": "dataset", "dataset": "mnist", "split": "test"}
    assert job["total"] == 10_000
    assert counts(job) == (10_000, 10_000, 0, 0)  # the 10,000 test digits are pairwise distinct
    assert job["images_per_second"] > 0

    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["embedded_count"] == info["index_size"] == 10_000
    first = client.get(f"{API}/collections/{collection}/images", params={"limit": 3}).json()
    assert [i["metadata"]["label"] for i in first] == ["7", "2", "1"]  # the first MNIST test labels
    assert first[0]["metadata"] == {"label": "7", "dataset": "mnist", "split": "test", "index": 0}
    assert (first[0]["width"], first[0]["height"]) == (28, 28)
