"""Import sources over HTTP: manifests (inside an archive, uploaded beside it, or on the server),
server folders in each layout, and the request shapes the import route refuses."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import ADMIN_HEADERS, admin_keyed, assert_problem
from tests.api.test_imports import counts, make_tar, make_zip, wait_for_job
from tests.holidays import holidays_subset
from tests.ingest.test_sources import mnist_subset

API = "/api/v1"
IMPORTS = f"{API}/collections/pets/imports"


@pytest.fixture
def client(settings: Settings, root: Path) -> Iterator[TestClient]:
    """A service allowed to import from ``root``, with an empty collection ``pets`` (tiny embedder)."""
    allowed = admin_keyed(settings, import_roots=str(root))
    with TestClient(create_app(allowed), raise_server_exceptions=False, headers=ADMIN_HEADERS) as test_client:
        response = test_client.post(f"{API}/collections", json={"name": "pets", "embedder": "tiny"})
        assert response.status_code == 201, response.text
        yield test_client


def submit(client: TestClient, **kwargs: object) -> dict:
    response = client.post(IMPORTS, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"])


def images(client: TestClient) -> dict[str, dict]:
    """original name -> metadata of every image in ``pets``."""
    rows = client.get(f"{API}/collections/pets/images", params={"limit": 500}).json()
    return {row["original_name"]: row["metadata"] for row in rows}


def errors(job: dict) -> list[tuple[str, str]]:
    return sorted((e["item"], e["code"]) for e in job["errors"])


def top_hit(client: TestClient, data: bytes) -> dict:
    response = client.post(f"{API}/collections/pets/search", params={"k": 1}, files={"file": ("q.png", data)})
    assert response.status_code == 200, response.text
    return response.json()["hits"][0]


# -- manifests with archives ---------------------------------------------------------------------
@pytest.fixture
def photos(make_png: Callable[..., bytes]) -> dict[str, bytes]:
    return {f"shots/{i}.png": make_png(100 + i) for i in range(4)}


CSV_MANIFEST = (
    "path,label,photographer,year\n"
    "shots/0.png,cat,Ann,2019\n"
    "./shots/1.png,dog,,2020\n"  # a "./" prefix names the same member
    "shots/2.png,cat,Bob,2021,surplus\n"  # more fields than the header: this row is invalid
    "shots/9.png,bird,Cy,2022\n"  # no such member
)
JSONL_MANIFEST = "\n".join(
    json.dumps(row)
    for row in (
        {"path": "shots/0.png", "label": "cat", "photographer": "Ann", "year": "2019"},
        {"path": "./shots/1.png", "label": "dog", "metadata": {"year": "2020"}},
        {"label": "cat", "note": "no path"},
        {"path": "shots/9.png", "label": "bird", "photographer": "Cy", "year": "2022"},
    )
)
MANIFEST_IMAGES = {
    "shots/0.png": {"label": "cat", "photographer": "Ann", "year": "2019"},
    "shots/1.png": {"label": "dog", "year": "2020"},
}


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize(
    ("manifest_name", "manifest"), [("manifest.csv", CSV_MANIFEST), ("manifest.jsonl", JSONL_MANIFEST)]
)
def test_a_manifest_inside_the_archive_chooses_the_members_and_their_metadata(
    client: TestClient, photos: dict[str, bytes], kind: str, manifest_name: str, manifest: str
) -> None:
    members = {**photos, manifest_name: manifest.encode()}
    archive = make_zip(members) if kind == "zip" else make_tar(members, mode="w:gz")
    job = submit(client, files={"file": (f"photos.{kind}", archive)})
    assert job["state"] == "succeeded", job
    assert counts(job) == (4, 2, 0, 2) and job["total"] == 4
    assert errors(job) == sorted([("row 3", "manifest_row_invalid"), ("shots/9.png", "missing_member")])
    # shots/2.png (a bad row) and shots/3.png (no row) are not imported, nor is the manifest
    assert images(client) == MANIFEST_IMAGES
    hit = top_hit(client, photos["shots/1.png"])
    assert (hit["original_name"], hit["label"], hit["score"] >= 0.999) == ("shots/1.png", "dog", True)
    report = client.get(f"{API}/jobs/{job['id']}/report").text.splitlines()
    assert len(report) == 4


def test_a_manifest_uploaded_beside_the_archive_is_used_instead_of_one_inside(
    client: TestClient, photos: dict[str, bytes], settings: Settings
) -> None:
    inside = b"path,label\nshots/3.png,ignored\n"
    beside = b'{"path": "shots/0.png", "label": "cat"}\n{"path": "shots/2.png", "label": "owl", "n": 2}\n'
    job = submit(
        client,
        files={
            "file": ("photos.tar", make_tar({**photos, "manifest.csv": inside})),
            "manifest": ("labels.jsonl", beside, "application/x-ndjson"),
        },
    )
    assert job["state"] == "succeeded", job
    assert counts(job) == (2, 2, 0, 0)
    assert job["params"] == {"source": "archive", "filename": "photos.tar", "manifest": True}
    assert images(client) == {"shots/0.png": {"label": "cat"}, "shots/2.png": {"label": "owl", "n": 2}}
    assert list(settings.uploads_dir.iterdir()) == []  # archive and manifest go when the job ends


@pytest.mark.parametrize(
    "manifest",
    [
        b"name,label\nshots/0.png,cat\n",
        "path,label\nshots/0.png,ch\xe2t\n".encode("latin-1"),
        b"\xff\xfe\xfd",
    ],
    ids=["no-path-column", "latin-1", "binary"],
)
def test_an_unreadable_uploaded_manifest_is_422_and_keeps_nothing(
    client: TestClient, photos: dict[str, bytes], settings: Settings, manifest: bytes
) -> None:
    response = client.post(
        IMPORTS, files={"file": ("photos.zip", make_zip(photos)), "manifest": ("manifest.csv", manifest)}
    )
    assert "'manifest.csv'" in assert_problem(response, 422, "bad_manifest")["detail"]
    assert list(settings.uploads_dir.iterdir()) == []
    assert list(settings.tmp_dir.iterdir()) == []
    assert client.get(f"{API}/jobs").json()["jobs"] == []


def test_an_unreadable_manifest_inside_the_archive_fails_the_job_with_its_reason(
    client: TestClient, photos: dict[str, bytes], settings: Settings
) -> None:
    # Checked when the job reads the archive, not at submission: the job fails, nothing is stored.
    job = submit(client, files={"file": ("photos.zip", make_zip({**photos, "manifest.csv": b"name\nx\n"}))})
    assert job["state"] == "failed" and "path" in job["error"], job
    assert client.get(f"{API}/collections/pets").json()["image_count"] == 0
    assert list(settings.uploads_dir.iterdir()) == []


def test_a_multipart_body_repeating_file_or_manifest_is_400(
    client: TestClient, photos: dict[str, bytes]
) -> None:
    archive = make_zip(photos)
    for files in (
        [("file", ("a.zip", archive)), ("file", ("b.zip", archive))],
        [
            ("file", ("a.zip", archive)),
            ("manifest", ("m.csv", b"path\na\n")),
            ("manifest", ("n.csv", b"path\n")),
        ],
    ):
        assert_problem(client.post(IMPORTS, files=files), 400, "bad_multipart")
    assert_problem(client.post(IMPORTS, files={"manifest": ("m.csv", b"path\na\n")}), 422, "invalid_request")


# -- server manifests ----------------------------------------------------------------------------
def test_a_server_manifest_imports_its_rows_and_rejects_rows_leaving_the_roots(
    client: TestClient, root: Path, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    (root / "photos" / "cat" / "leak.png").symlink_to(tmp_path / "secret" / "private.png")
    manifest = root / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,label,split\n"
        "../photos/cat/1.png,tabby,train\n"
        f"{root}/photos/dog/4.png,terrier,test\n"
        "../../secret/private.png,stolen,x\n"
        f"{tmp_path}/secret/private.png,stolen,x\n"
        "../photos/cat/leak.png,stolen,x\n"
        "../photos/cat/none.png,gone,x\n"
        ",empty,x\n"
    )
    job = submit(client, json={"manifest": str(manifest)})
    assert job["state"] == "succeeded", job
    assert job["params"]["source"] == "manifest" and job["params"]["path"] == str(manifest)
    assert counts(job) == (7, 2, 0, 5) and job["total"] == 7
    assert errors(job) == sorted(
        [
            ("../../secret/private.png", "path_outside_root"),
            (f"{tmp_path}/secret/private.png", "path_outside_root"),
            ("../photos/cat/leak.png", "symlink_outside_root"),
            ("../photos/cat/none.png", "file_unreadable"),
            ("row 7", "manifest_row_invalid"),
        ]
    )
    assert images(client) == {
        "../photos/cat/1.png": {"label": "tabby", "split": "train"},
        f"{root}/photos/dog/4.png": {"label": "terrier", "split": "test"},
    }
    assert top_hit(client, make_png(99))["score"] < 0.999  # the secret image was never stored


def test_a_server_manifest_outside_the_roots_is_403_and_a_bad_one_422(
    client: TestClient, root: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret" / "manifest.csv").write_text("path\nprivate.png\n")
    (root / "link.csv").symlink_to(tmp_path / "secret" / "manifest.csv")
    for path in (
        tmp_path / "secret" / "manifest.csv",
        root / ".." / "secret" / "manifest.csv",
        root / "link.csv",
    ):
        assert_problem(client.post(IMPORTS, json={"manifest": str(path)}), 403, "path_outside_root")
    assert_problem(client.post(IMPORTS, json={"manifest": str(root / "none.csv")}), 403, "path_outside_root")
    (root / "bad.csv").write_bytes(b"label\ncat\n")
    assert_problem(client.post(IMPORTS, json={"manifest": str(root / "bad.csv")}), 422, "bad_manifest")
    (root / "bad.jsonl").write_bytes(b'{"path": "\xff"}\n')
    assert_problem(client.post(IMPORTS, json={"manifest": str(root / "bad.jsonl")}), 422, "bad_manifest")
    assert_problem(client.post(IMPORTS, json={"manifest": "lists/manifest.csv"}), 422, "invalid_request")
    assert client.get(f"{API}/jobs").json()["jobs"] == []


def test_server_manifests_are_off_without_roots(settings: Settings, root: Path) -> None:
    (root / "manifest.csv").write_text("path\nphotos/cat/1.png\n")
    keyed = admin_keyed(settings)
    with TestClient(create_app(keyed), raise_server_exceptions=False, headers=ADMIN_HEADERS) as client:
        client.post(f"{API}/collections", json={"name": "pets", "embedder": "tiny"})
        response = client.post(IMPORTS, json={"manifest": str(root / "manifest.csv")})
        assert "CBIR_IMPORT_ROOTS" in assert_problem(response, 403, "folder_not_allowed")["detail"]


# -- server folders in each layout ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["auto", "idx"])
def test_an_idx_folder_imports_each_digit_with_its_label(client: TestClient, root: Path, layout: str) -> None:
    _, labels = mnist_subset(root / "digits", 50)
    job = submit(client, json={"folder": str(root / "digits"), "layout": layout})
    assert job["state"] == "succeeded", job
    assert job["params"]["source"] == "idx"
    assert counts(job) == (50, 50, 0, 0) and job["total"] == 50
    stored = images(client)
    assert len(stored) == 50
    assert stored["t10k-00007.png"] == {
        "file": "t10k-images-idx3-ubyte.gz",
        "index": 7,
        "label": str(labels[7]),
    }
    info = client.get(f"{API}/collections/pets").json()
    assert info["image_count"] == info["index_size"] == 50


def test_a_holidays_folder_is_labelled_by_query(client: TestClient, root: Path) -> None:
    folder = root / "holidays"
    truth = holidays_subset(folder, (1000, 1001, 1002, 1003))
    (folder / "groundtruth.json").write_text(json.dumps(truth))
    job = submit(client, json={"folder": str(folder), "layout": "holidays"})
    assert job["state"] == "succeeded", job
    assert job["params"]["source"] == "holidays"
    assert counts(job) == (10, 10, 0, 0)
    stored = images(client)
    assert stored["100000.jpg"] == {"label": "100000", "role": "query"}
    assert stored["100002.jpg"] == {"label": "100000", "role": "relevant"}
    assert {name: meta["label"] for name, meta in stored.items()} == {
        name: query[:-4] for query, relevant in truth.items() for name in (query, *relevant)
    }
    labels = client.get(f"{API}/collections/pets/labels").json()
    assert (labels["distinct"], labels["unlabelled"]) == (len(truth), 0)
    assert {row["label"]: row["count"] for row in labels["labels"]} == {
        query[:-4]: 1 + len(relevant) for query, relevant in truth.items()
    }


def test_an_image_folder_with_layout_images_is_labelled_by_subfolder(client: TestClient, root: Path) -> None:
    job = submit(client, json={"folder": str(root / "photos"), "layout": "images"})
    assert job["state"] == "succeeded" and counts(job) == (5, 5, 0, 0), job
    assert job["params"] == {"source": "folder", "path": str(root / "photos")}
    assert {meta["label"] for meta in images(client).values()} == {"cat", "dog"}


@pytest.mark.parametrize(
    ("layout", "reason"), [("idx", "idx3"), ("holidays", "groundtruth.json"), ("csv", "layout")]
)
def test_a_layout_the_folder_does_not_have_is_422(
    client: TestClient, root: Path, layout: str, reason: str
) -> None:
    body = assert_problem(client.post(IMPORTS, json={"folder": str(root / "photos"), "layout": layout}), 422)
    assert body["code"] == "invalid_request" and reason in body["detail"]


# -- request shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"dataset": "mnist", "split": "test", "folder": "/tmp"},
        {"dataset": "mnist", "manifest": "/tmp/m.csv"},
        {"folder": "/tmp", "manifest": "/tmp/m.csv"},
        {"dataset": "mnist", "split": "test", "limit": 10},
        {"folder": "/tmp", "labels": "subfolders"},
        {},
        {"layout": "idx"},
        {"manifest": 3},
    ],
)
def test_a_json_body_with_two_sources_or_unknown_keys_is_422(client: TestClient, body: dict) -> None:
    assert_problem(client.post(IMPORTS, json=body), 422, "invalid_request")
    assert client.get(f"{API}/jobs").json()["jobs"] == []
