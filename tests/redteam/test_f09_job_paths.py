"""Finding 9: the server paths of admin imports (folders, manifests) are shown to admin keys only.

An admin starts a server-folder import and a server-manifest import; a caller without a key (or
with a read or write key) lists the jobs and reads each one: no path of the server appears, the
source says which import root it came from. The admin sees the paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.core.settings import Settings
from app.main import create_app

API = "/api/v1"
ADMIN = {"X-API-Key": "admin-key-of-the-job-path-tests"}
WRITER = {"X-API-Key": "write-key-of-the-job-path-tests"}
READER = {"X-API-Key": "read-key-of-the-job-path-tests"}


@pytest.fixture
def root(tmp_path: Path, make_png: Callable[..., bytes]) -> Path:
    base = tmp_path / "srv-private-photos"
    for seed, label in enumerate(("cat", "dog")):
        (base / label).mkdir(parents=True)
        (base / label / "1.png").write_bytes(make_png(seed))
    (base / "list.csv").write_text(f"path,label\ncat/1.png,tabby\n{base}/dog/1.png,terrier\n")
    return base


@pytest.fixture
def api(settings: Settings, root: Path) -> Iterator[TestClient]:
    keys = ",".join(
        f"{scope}:{headers['X-API-Key']}"
        for scope, headers in (("admin", ADMIN), ("write", WRITER), ("read", READER))
    )
    rooted = settings.model_copy(update={"import_roots": f"photos={root}", "api_keys": SecretStr(keys)})
    with TestClient(create_app(rooted), raise_server_exceptions=False) as client:
        response = client.post(
            f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}, headers=ADMIN
        )
        assert response.status_code == 201, response.text
        yield client


def run(client: TestClient, body: dict) -> str:
    response = client.post(f"{API}/collections/shapes/imports", json=body, headers=ADMIN)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 60
    while client.get(f"{API}/jobs/{job_id}").json()["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job_id


@pytest.mark.timeout(60)
def test_server_paths_of_admin_imports_are_shown_to_admin_keys_only(api: TestClient, root: Path) -> None:
    folder = run(api, {"folder": str(root / "cat")})
    named = run(api, {"root": "photos", "path": "dog"})
    manifest = run(api, {"manifest": str(root / "list.csv")})
    for headers in ({}, READER, WRITER):
        listing = api.get(f"{API}/jobs", headers=headers)
        assert listing.status_code == 200
        assert "srv-private-photos" not in listing.text, listing.text
        for job_id in (folder, named, manifest):
            job = api.get(f"{API}/jobs/{job_id}", headers=headers)
            assert job.status_code == 200 and "srv-private-photos" not in job.text, job.text
        shown = {job["id"]: job["params"] for job in listing.json()["jobs"]}
        assert shown[folder] == shown[named] == {"source": "folder", "root": "photos"}
        assert shown[manifest] == {"source": "manifest", "root": "photos"}
    admin = {job["id"]: job["params"] for job in api.get(f"{API}/jobs", headers=ADMIN).json()["jobs"]}
    assert admin[folder] == {"source": "folder", "path": str(root / "cat")}
    assert admin[named] == {"source": "folder", "path": str(root / "dog")}
    assert admin[manifest] == {"source": "manifest", "path": str(root / "list.csv")}
    # The manifest's report names the rows as written (absolute paths): the admin's scope only.
    assert api.get(f"{API}/jobs/{manifest}/report", headers=WRITER).status_code == 403
    assert str(root) in api.get(f"{API}/jobs/{manifest}/report", headers=ADMIN).text
