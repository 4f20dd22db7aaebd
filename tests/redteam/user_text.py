"""Helpers of the red-team tests on user text and metadata (findings 3, 4, 10 and 12)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import job_report
from tests.api.test_imports import make_zip, start_archive_import, wait_for_job

API = "/api/v1"


def upload(client: TestClient, collection: str, data: bytes, metadata: str | None = None) -> httpx.Response:
    form = {"metadata": metadata} if metadata is not None else None
    return client.post(f"{API}/collections/{collection}/images", files={"file": ("a.png", data)}, data=form)


def image_count(client: TestClient, collection: str) -> int:
    response = client.get(f"{API}/collections/{collection}")
    assert response.status_code == 200, response.text
    return int(response.json()["image_count"])


def reads(client: TestClient, collection: str, *, image_id: int, query: bytes) -> dict[str, httpx.Response]:
    """Every read a bad stored row once broke: labels, filtered browsing, filtered search."""
    search = f"{API}/collections/{collection}/search"
    return {
        "labels": client.get(f"{API}/collections/{collection}/labels"),
        "browse": client.get(f"{API}/collections/{collection}/images"),
        "browse label": client.get(f"{API}/collections/{collection}/images", params={"label": "5"}),
        "browse meta": client.get(f"{API}/collections/{collection}/images", params={"meta": "split:train"}),
        "image": client.get(f"{API}/images/{image_id}"),
        "similar": client.get(f"{API}/collections/{collection}/images/{image_id}/similar"),
        "similar label": client.get(
            f"{API}/collections/{collection}/images/{image_id}/similar", params={"label": "5"}
        ),
        "search label": client.post(search, params={"label": "5"}, files={"file": ("q.png", query)}),
    }


def assert_reads_work(client: TestClient, collection: str, *, image_id: int, query: bytes) -> None:
    failed = {
        what: (r.status_code, r.text[:200])
        for what, r in reads(client, collection, image_id=image_id, query=query).items()
        if r.status_code != 200
    }
    assert not failed, failed


def manifest_import(client: TestClient, collection: str, *, rows: list[str], files: dict[str, bytes]) -> dict:
    """Import a zip of ``files`` and a manifest.jsonl of ``rows`` (JSON text, one per line); the
    finished job with its report ({item: (status, code)}) under "report"."""
    archive = make_zip({**files, "manifest.jsonl": "\n".join(rows).encode()})
    response = start_archive_import(client, collection, archive)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    job["report"] = job_report(client, job)
    return job


def tar_with_raw_names(members: dict[bytes, bytes]) -> bytes:
    """A tar whose member names are these bytes exactly (invalid UTF-8 included)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as archive:
        for raw, data in members.items():
            info = tarfile.TarInfo(raw.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def zip_with_raw_name(good: bytes, other: bytes, *, raw: bytes) -> bytes:
    """A zip of "cat/good.png" and a member named "cat/<raw>.png" (``raw``: 11 bytes, say not
    UTF-8) whose header flags the name as UTF-8."""
    placeholder = "PLACEHOLDé"  # not ASCII: zipfile writes it as UTF-8 and flags it so
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("cat/good.png", good)
        archive.writestr(f"cat/{placeholder}.png", other)
    encoded = placeholder.encode("utf-8")
    assert len(raw) == len(encoded)
    return out.getvalue().replace(encoded, raw)  # in the local header and the directory


def store_raw_metadata(client: TestClient, image_id: int, raw: str) -> None:
    """Write ``raw`` as the image's stored metadata text, bypassing every check (a row an older
    version stored)."""
    engine = client.app.state.context.db.engine  # type: ignore[attr-defined]
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE images SET metadata = :raw WHERE id = :id"), {"raw": raw, "id": image_id}
        )


@contextmanager
def restarted(settings: Settings) -> Iterator[TestClient]:
    """The service started again on the same data folder and database."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def seeded(client: TestClient, collection: str, make_png: Callable[..., bytes]) -> list[int]:
    """Three good images labelled 5 (one of them split:train) in ``collection``; their ids."""
    ids = []
    for seed, meta in enumerate(({"label": "5", "split": "train"}, {"label": "5"}, {"label": "6"})):
        response = upload(client, collection, make_png(seed), json.dumps(meta))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids
