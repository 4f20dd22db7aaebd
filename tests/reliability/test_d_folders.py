"""Reliability plan, section D: folder indexing on the server (scenarios 32-35; 36 is in
test_i_access.py).

The plan's ``ALLOWED_ROOTS={"photos": tmp/photos}`` is ``CBIR_IMPORT_ROOTS=photos=<tmp>/photos``
here, and its ``root=photos`` + ``path`` is the JSON body ``{"root": "photos", "path": ...}`` of
``POST /collections/{name}/imports`` (beside ``{"folder": <absolute path>}``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.errors import PathOutsideRoot
from app.core.settings import Settings
from app.ingest.sources import files as server_files
from app.main import create_app
from tests.api.helpers import ADMIN_HEADERS, admin_keyed, assert_problem, job_report
from tests.api.test_imports import counts, wait_for_job

API = "/api/v1"
IMPORTS = f"{API}/collections/shapes/imports"
MiB = 1024 * 1024


@pytest.fixture
def tree(tmp_path: Path, make_png: Callable[..., bytes]) -> Path:
    """tmp/photos/{cat,dog}/*.png, and beside it photos_private/, outside/ and secret.png."""
    for n, label in enumerate(("cat", "dog")):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "photos" / label / f"{i}.png").write_bytes(make_png(10 * n + i))
    (tmp_path / "photos_private").mkdir()
    (tmp_path / "photos_private" / "private.png").write_bytes(make_png(90))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "far.png").write_bytes(make_png(91))
    (tmp_path / "secret.png").write_bytes(make_png(92))
    return tmp_path


@pytest.fixture
def rooted(settings: Settings, tree: Path) -> Settings:
    return admin_keyed(settings, import_roots=f"photos={tree / 'photos'}")


@pytest.fixture
def api(rooted: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(rooted), raise_server_exceptions=False, headers=ADMIN_HEADERS) as client:
        response = client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
        assert response.status_code == 201
        yield client


def run(client: TestClient, body: dict) -> dict:
    response = client.post(IMPORTS, json=body)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"])


def indexed(client: TestClient) -> set[str]:
    images = client.get(f"{API}/collections/shapes/images", params={"limit": 500}).json()
    return {image["original_name"] for image in images}


# -- 32 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "../",
        "../../etc",
        "/etc",
        "%2e%2e/",
        "%2e%2e/photos_private",
        "..%2fphotos_private",
        "%252e%252e/",
        "../photos_private",
        "cat/../../photos_private",
        "C:/Windows",
        "cat/\u0000",
    ],
)
def test_r32_paths_leaving_the_named_root_are_refused(api: TestClient, path: str) -> None:
    assert_problem(api.post(IMPORTS, json={"root": "photos", "path": path}), 403, "path_outside_root")
    assert api.get(f"{API}/jobs").json()["jobs"] == []
    assert api.get(f"{API}/collections/shapes").json()["image_count"] == 0


def test_r32_absolute_folders_outside_the_roots_are_refused(api: TestClient, tree: Path) -> None:
    for folder in (tree / "photos_private", tree / "photos" / ".." / "photos_private", Path("/etc"), tree):
        response = api.post(IMPORTS, json={"folder": str(folder)})
        assert_problem(response, 403, "path_outside_root")
    (tree / "photos" / "escape").symlink_to(tree / "photos_private")
    assert_problem(api.post(IMPORTS, json={"root": "photos", "path": "escape"}), 403, "path_outside_root")
    assert_problem(api.post(IMPORTS, json={"root": "elsewhere", "path": ""}), 422, "invalid_request")
    assert_problem(api.post(IMPORTS, json={"path": "cat"}), 422, "invalid_request")  # path without root
    assert api.get(f"{API}/jobs").json()["jobs"] == []


def test_r32_a_path_inside_the_named_root_is_imported(api: TestClient, tree: Path) -> None:
    job = run(api, {"root": "photos", "path": "cat"})
    assert job["state"] == "succeeded" and counts(job) == (2, 2, 0, 0), job
    assert job["params"]["path"] == str(tree / "photos" / "cat")
    job = run(api, {"root": "photos"})  # the root itself
    assert counts(job) == (4, 2, 2, 0)
    assert indexed(api) == {"0.png", "1.png", "dog/0.png", "dog/1.png"}  # relative to the folder


def test_r32_import_roots_are_named_by_entry_or_by_folder_name(tmp_path: Path) -> None:
    roots = Settings(import_roots=f"photos={tmp_path / 'a'}:{tmp_path / 'scans'}:{tmp_path / 'x=y'}")
    assert roots.import_root_map == {
        "photos": tmp_path / "a",
        "scans": tmp_path / "scans",
        "x=y": tmp_path / "x=y",
    }
    assert roots.import_root_paths == [tmp_path / "a", tmp_path / "scans", tmp_path / "x=y"]
    with pytest.raises(PathOutsideRoot):
        server_files.in_root(roots.import_root_map, "photos", "%2E%2E/scans")


# -- 33 ---------------------------------------------------------------------------------------
def test_r33_symlinks_leaving_the_root_are_skipped_per_item(api: TestClient, tree: Path) -> None:
    photos = tree / "photos"
    (photos / "cat" / "leak.png").symlink_to(tree / "secret.png")
    (photos / "dog" / "outside").symlink_to(tree / "outside", target_is_directory=True)
    (photos / "dog" / "relative.png").symlink_to("../../secret.png")
    (photos / "dog" / "alias.png").symlink_to(photos / "cat" / "0.png")  # inside: followed
    (photos / "cat" / "again").symlink_to(photos / "dog", target_is_directory=True)  # inside: not walked
    job = run(api, {"root": "photos"})
    assert job["state"] == "succeeded", job
    items = job_report(api, job)
    for name in ("cat/leak.png", "dog/outside", "dog/relative.png"):
        assert items[name] == ("rejected", "symlink_outside_root")
    assert items["dog/alias.png"] == ("duplicate", None)
    assert "cat/again" not in items and not any(name.startswith("cat/again/") for name in items)
    assert counts(job) == (8, 4, 1, 3)
    assert indexed(api) == {"cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"}


# -- 34 ---------------------------------------------------------------------------------------
def release_readers(*fifos: Path) -> None:
    """Unblock a reader stuck opening one of these FIFOs, so a regression fails the test (on its
    timeout) instead of hanging the job runner and the app's shutdown for ever."""
    for fifo in fifos:
        with contextlib.suppress(OSError):  # ENXIO: no reader waiting, nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.timeout(20)
def test_r34_fifos_sockets_and_vanished_files_are_skipped_without_a_hang(
    api: TestClient, tree: Path, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = tree / "photos" / "cat"
    os.mkfifo(cat / "pipe.png")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = Path.cwd()
    os.chdir(cat)  # a socket path must be short
    try:
        server.bind("sock.png")
    finally:
        os.chdir(here)
    (cat / "dangling.png").symlink_to(cat / "nowhere.png")
    (cat / "vanishing.png").write_bytes(make_png(50))
    (cat / "swapped.png").write_bytes(make_png(51))

    real_read = server_files._read_file

    def between_walk_and_open(path: Path, *, max_bytes: int) -> bytes:
        # the hook the plan asks for: the file changes after it was listed, before it is opened
        if path.name == "vanishing.png":
            path.unlink()
        elif path.name == "swapped.png":
            path.unlink()
            os.mkfifo(path)  # a reader that opened it blocking would hang here
        return real_read(path, max_bytes=max_bytes)

    monkeypatch.setattr(server_files, "_read_file", between_walk_and_open)
    try:
        job = run(api, {"root": "photos", "path": "cat"})
    finally:
        server.close()
        release_readers(cat / "pipe.png", cat / "swapped.png")
    assert job["state"] == "succeeded", job
    items = job_report(api, job)
    assert items["pipe.png"] == ("rejected", "not_a_regular_file")
    assert items["sock.png"] == ("rejected", "not_a_regular_file")
    assert items["dangling.png"] == ("rejected", "file_unreadable")
    assert items["vanishing.png"] == ("rejected", "file_unreadable")
    assert items["swapped.png"] == ("rejected", "not_a_regular_file")
    assert counts(job) == (7, 2, 0, 5)


# -- 35 ---------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_r35_a_folder_over_the_file_cap_stops_with_limit_reached(
    settings: Settings, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    many = tmp_path / "many"
    (many / "b").mkdir(parents=True)
    (many / "a").mkdir()
    with (many / "a" / "big.png").open("wb") as handle:
        handle.truncate(50 * MiB)  # sparse: 50 MiB to stat, nothing on disk
    data = make_png(7)
    for i in range(5000):
        (many / "b" / f"{i:04d}.png").write_bytes(data)
    capped = admin_keyed(settings, import_roots=str(many), max_folder_files=1000)
    with TestClient(create_app(capped), raise_server_exceptions=False, headers=ADMIN_HEADERS) as api:
        assert api.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
        job = run(api, {"root": "many"})
        assert job["state"] == "succeeded", job
        # a/big.png and b/0000-0998 are the first 1,000 files; b/0999 is where the cap stops it
        assert job["total"] == job["done"] == 1001
        assert counts(job) == (1001, 1, 998, 2)
        assert {e["item"]: e["code"] for e in job["errors"]} == {
            "a/big.png": "image_too_large",
            "b/0999.png": "limit_reached",
        }
        items = job_report(api, job)
        assert items["b/0000.png"] == ("added", None)
        assert "b/1000.png" not in items
        info = api.get(f"{API}/collections/shapes").json()
        assert info["image_count"] == info["index_size"] == 1
