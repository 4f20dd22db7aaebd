"""Server-folder imports over HTTP: only under CBIR_IMPORT_ROOTS, links never lead outside."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import ADMIN_HEADERS, admin_keyed, assert_problem
from tests.api.test_imports import wait_for_job

API = "/api/v1"


@pytest.fixture
def rooted(settings: Settings, root: Path) -> Iterator[TestClient]:
    with TestClient(
        create_app(admin_keyed(settings, import_roots=str(root))), headers=ADMIN_HEADERS
    ) as client:
        assert client.post(f"{API}/collections", json={"name": "pets", "embedder": "tiny"}).status_code == 201
        yield client


def test_a_folder_under_a_root_is_imported_with_labels(rooted: TestClient, root: Path) -> None:
    response = rooted.post(f"{API}/collections/pets/imports", json={"folder": str(root / "photos")})
    assert response.status_code == 202, response.text
    job = wait_for_job(rooted, response.json()["job_id"])
    assert (job["state"], job["added"], job["failed"]) == ("succeeded", 5, 0)
    labels = {i["metadata"]["label"] for i in rooted.get(f"{API}/collections/pets/images").json()}
    assert labels == {"cat", "dog"}
    again = wait_for_job(
        rooted,
        rooted.post(f"{API}/collections/pets/imports", json={"folder": str(root / "photos")}).json()[
            "job_id"
        ],
    )
    assert (again["added"], again["duplicates"]) == (0, 5)


def test_folders_outside_the_roots_are_refused(rooted: TestClient, root: Path, tmp_path: Path) -> None:
    url = f"{API}/collections/pets/imports"
    for folder in (tmp_path / "secret", root / ".." / "secret", tmp_path / "missing", Path("/")):
        assert_problem(rooted.post(url, json={"folder": str(folder)}), 403, "path_outside_root")
    (root / "escape").symlink_to(tmp_path / "secret")
    assert_problem(rooted.post(url, json={"folder": str(root / "escape")}), 403, "path_outside_root")
    assert_problem(rooted.post(url, json={"folder": "photos"}), 422)  # relative
    assert_problem(rooted.post(url, json={"folder": str(root), "dataset": "mnist"}), 422)


def test_a_link_inside_the_folder_to_a_file_outside_is_rejected_per_item(
    rooted: TestClient, root: Path, tmp_path: Path
) -> None:
    (root / "photos" / "cat" / "leak.png").symlink_to(tmp_path / "secret" / "private.png")
    job = wait_for_job(
        rooted,
        rooted.post(f"{API}/collections/pets/imports", json={"folder": str(root / "photos")}).json()[
            "job_id"
        ],
    )
    assert (job["state"], job["added"], job["failed"]) == ("succeeded", 5, 1)
    assert job["errors"][0]["code"] == "symlink_outside_root"


def test_folder_imports_are_off_without_roots(settings: Settings, root: Path) -> None:
    with TestClient(create_app(admin_keyed(settings)), headers=ADMIN_HEADERS) as client:
        assert client.post(f"{API}/collections", json={"name": "pets", "embedder": "tiny"}).status_code == 201
        response = client.post(f"{API}/collections/pets/imports", json={"folder": str(root / "photos")})
    assert "CBIR_IMPORT_ROOTS" in assert_problem(response, 403, "folder_not_allowed")["detail"]


def test_folder_imports_need_an_admin_key_even_before_any_key_exists(
    client: TestClient, collection: str, root: Path
) -> None:
    """CBIR_AUTH=auto with no key yet leaves uploads open, but never the server's own files."""
    for body in ({"folder": str(root / "photos")}, {"manifest": str(root / "m.csv")}, {"root": "photos"}):
        response = client.post(f"{API}/collections/{collection}/imports", json=body)
        assert_problem(response, 401, "unauthorized")
    keyless_upload = client.post(f"{API}/collections/{collection}/images", files={"file": ("a.png", b"x")})
    assert keyless_upload.status_code == 422  # reached the decoder: writes stay open without keys


def test_a_folder_path_with_a_nul_byte_is_refused_not_a_crash(rooted: TestClient, root: Path) -> None:
    response = rooted.post(f"{API}/collections/pets/imports", json={"folder": str(root) + "/\u0000x"})
    assert_problem(response, 403, "path_outside_root")
