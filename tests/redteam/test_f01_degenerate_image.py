"""Finding 1: an image whose code is degenerate (an all-black PNG gives a zero vector) is refused
with 422 degenerate_image before anything is stored, on upload, on search and per archive member;
and a stored row the index refuses (a restored backup) never stops the service from starting."""

from __future__ import annotations

import io
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import assert_problem, job_report
from tests.api.test_imports import make_zip, run_import
from tests.liveserver import LiveServer, server_env
from tests.redteam.conftest import tiny_server

API = "/api/v1"


def black_png(size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("L", (size, size), 0).save(out, format="PNG")
    return out.getvalue()


def noise_png(seed: int, size: int = 28) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def upload(
    send: Callable[..., httpx.Response], collection: str, data: bytes, *, prefix: str = API
) -> httpx.Response:
    """``send`` is a TestClient's ``request`` (``prefix`` /api/v1) or a LiveServer's ``api`` ("")."""
    return send(
        "POST", f"{prefix}/collections/{collection}/images", files={"file": ("a.png", data, "image/png")}
    )


def stored_files(settings: Settings) -> list[Path]:
    return [p for p in settings.images_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("embedder", ["tiny", "pixels"])
def test_all_black_upload_is_refused_as_degenerate_and_nothing_is_stored(
    client: TestClient, settings: Settings, embedder: str
) -> None:
    assert client.post(f"{API}/collections", json={"name": "c", "embedder": embedder}).status_code == 201
    good = noise_png(1)
    assert upload(client.request, "c", good).status_code == 201

    for _ in range(2):  # the same bytes again: refused again, never "created: false"
        body = assert_problem(upload(client.request, "c", black_png()), 422, "degenerate_image")
        assert "nothing was stored" in body["detail"], body
    info = client.get(f"{API}/collections/c").json()
    assert info["image_count"] == info["index_size"] == 1, info
    assert len(stored_files(settings)) == 1

    search = client.post(f"{API}/collections/c/search", files={"file": ("q.png", black_png(), "image/png")})
    assert_problem(search, 422, "degenerate_image")
    hits = client.post(f"{API}/collections/c/search", files={"file": ("q.png", good, "image/png")}).json()
    assert hits["hits"][0]["score"] > 0.9999


@pytest.mark.parametrize(
    "processes", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["threads", "worker-processes"]
)
def test_archive_with_a_black_member_rejects_it_and_stores_and_indexes_the_rest(
    settings: Settings, processes: bool
) -> None:
    valid = noise_png(7)
    # Worker processes embed in another process and hand the vectors back: checked all the same.
    piped = settings.model_copy(update={"import_processes": processes, "import_workers": 1})
    with TestClient(create_app(piped), raise_server_exceptions=False) as client:
        assert client.post(f"{API}/collections", json={"name": "c", "embedder": "tiny"}).status_code == 201
        job = run_import(client, "c", make_zip({"black.png": black_png(), "valid.png": valid}))
        assert job["state"] == "succeeded", job
        assert (job["added"], job["failed"]) == (1, 1), job
        report = job_report(client, job)
        assert report["black.png"] == ("rejected", "degenerate_image"), report
        assert report["valid.png"][0] == "added", report

        info = client.get(f"{API}/collections/c").json()
        assert info["image_count"] == info["index_size"] == 1, info
        hits = client.post(f"{API}/collections/c/search", files={"file": ("q.png", valid)}).json()
        assert hits["hits"][0]["score"] > 0.9999, hits


# -- a stored row the index refuses, with a real server restart ------------------------------------


def _insert_rows(data_dir: Path, *, collection: str, vectors: dict[str, bytes]) -> dict[str, int]:
    """Image rows with the given vector blobs, written straight into the database (as a restored
    backup, or an older version of the service, might have left them): name -> image id."""
    ids = {}
    with sqlite3.connect(data_dir / "cbir.sqlite3") as db:
        (collection_id, version) = db.execute(
            "select id, embedder_version from collections where name = ?", (collection,)
        ).fetchone()
        for n, (name, blob) in enumerate(vectors.items()):
            cursor = db.execute(
                "insert into images (collection_id, sha256, byte_size, format, width, height, "
                "original_name, metadata, created_at) values (?, ?, 1, 'PNG', 16, 16, ?, '{}', "
                "'2024-01-01 00:00:00')",
                (collection_id, f"{n:064x}", name),
            )
            ids[name] = int(cursor.lastrowid or 0)
            db.execute(
                "insert into embeddings (image_id, embedder, embedder_version, dim, vector, created_at) "
                "values (?, 'tiny', ?, ?, ?, '2024-01-01 00:00:00')",
                (ids[name], version, len(blob) // 4, blob),
            )
    return ids


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stored_zero_nan_and_short_vectors_are_set_aside_at_restart_and_reported(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    server = tiny_server(tmp_path)
    live.append(server.start())
    for name in ("a", "b"):
        assert server.api("POST", "/collections", json={"name": name, "embedder": "tiny"}).status_code == 201
    good = {
        name: upload(server.api, name, noise_png(seed), prefix="").json()["id"]
        for seed, name in enumerate("ab")
    }
    server.stop()

    nan = np.zeros(64, dtype="<f4")
    nan[3] = np.nan
    refused = _insert_rows(
        server.data_dir,
        collection="a",
        vectors={
            "zero.png": np.zeros(64, dtype="<f4").tobytes(),
            "nan.png": nan.tobytes(),
            "short.png": np.ones(10, dtype="<f4").tobytes(),
        },
    )
    # The index file is gone too, as after a restore: the index is built from the database.
    (server.data_dir / "indexes" / "collection-1.cbidx").unlink()

    server = tiny_server(tmp_path)
    live.append(server.start())
    ready = server.api("GET", "/ready")
    assert ready.status_code == 200, ready.text
    (problem,) = [p for p in ready.json()["problems"] if p["code"] == "vectors_refused"]
    assert problem["collection"] == "a" and sorted(problem["image_ids"]) == sorted(refused.values())
    assert problem["hint"], problem
    health = server.api("GET", "/health").json()
    assert health["status"] == "degraded" and "vectors_refused" in health["degraded"], health

    for name, seed in (("a", 0), ("b", 1)):  # both collections serve their good images
        hits = server.api(
            "POST", f"/collections/{name}/search", files={"file": ("q.png", noise_png(seed), "image/png")}
        )
        assert hits.status_code == 200, hits.text
        assert hits.json()["hits"][0]["id"] == good[name], hits.json()
    for image_id in refused.values():
        similar = server.api("GET", f"/collections/a/images/{image_id}/similar")
        assert_problem(similar, 422, "degenerate_image")  # a set-aside row cannot be a query
    index = server.api("GET", "/collections/a/index").json()
    assert index["ntotal"] == 1 and index["problems"][0]["code"] == "vectors_refused", index

    # Deleting a refused row clears it from the report.
    assert server.api("DELETE", f"/images/{refused['zero.png']}").status_code == 204
    (problem,) = [p for p in server.api("GET", "/ready").json()["problems"] if p["code"] == "vectors_refused"]
    assert refused["zero.png"] not in problem["image_ids"]

    server.stop()
    assert server.process is not None and server.process.returncode in (0, -signal.SIGTERM)
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "cbir"), "collections", "list"],
        env=server_env(server.data_dir, CBIR_DEFAULT_EMBEDDER="tiny"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["a", "b"], listed.stdout


def test_a_collection_whose_index_cannot_open_does_not_stop_the_others(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.indexing import manager as indexes

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for name in ("a", "b"):
            assert (
                client.post(f"{API}/collections", json={"name": name, "embedder": "tiny"}).status_code == 201
            )
            assert upload(client.request, name, noise_png(ord(name))).status_code == 201

    real = indexes.IndexManager._open

    def broken(self: indexes.IndexManager, collection: object) -> object:
        if getattr(collection, "name", None) == "a":
            raise RuntimeError("a disk error while reading the index")
        return real(self, collection)  # type: ignore[arg-type]

    monkeypatch.setattr(indexes.IndexManager, "_open", broken)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get(f"{API}/ready")
        assert ready.status_code == 200, ready.text
        assert [(p["collection"], p["code"]) for p in ready.json()["problems"]] == [
            ("a", "index_unavailable")
        ]
        assert "index_unavailable" in client.get(f"{API}/health").json()["degraded"]
        query = {"file": ("q.png", noise_png(ord("b")), "image/png")}
        assert client.post(f"{API}/collections/b/search", files=query).status_code == 200
        assert_problem(client.post(f"{API}/collections/a/search", files=query), 503, "index_unavailable")
        assert client.get(f"{API}/collections").status_code == 200


def test_similar_to_a_set_aside_row_of_another_dimension_is_a_422_not_a_503(settings: Settings) -> None:
    """A unit-norm 32-d row in a 64-d collection (a restored backup's) is set aside at the start; a
    query by it is refused as degenerate, never "being rebuilt, retry shortly" forever."""
    from sqlalchemy import select

    from app.data.records import CollectionRecord
    from tests.synthetic import insert_synthetic

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post(f"{API}/collections", json={"name": "c", "embedder": "tiny"}).status_code == 201
        good = [upload(client.request, "c", noise_png(seed)).json()["id"] for seed in range(3)]
        ctx = client.app.state.context  # type: ignore[attr-defined]
        with ctx.db.session() as session:
            record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == "c"))
        short = np.zeros((1, 32), dtype=np.float32)
        short[0, 0] = 1.0  # unit norm: only its dimension is wrong
        (odd,) = insert_synthetic(
            ctx.db,
            collection_id=record.id,
            vectors=short,
            embedder=record.embedder,
            embedder_version=record.embedder_version,
            tag="short",
        )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:  # a restart
        (problem,) = client.get(f"{API}/ready").json()["problems"]
        assert (problem["code"], problem["image_ids"]) == ("vectors_refused", [int(odd)]), problem
        for _ in range(2):
            body = assert_problem(
                client.get(f"{API}/collections/c/images/{int(odd)}/similar"), 422, "degenerate_image"
            )
            assert "32" in body["detail"] and "set aside" in body["detail"], body
        hits = client.get(f"{API}/collections/c/images/{good[0]}/similar", params={"k": 2})
        assert hits.status_code == 200 and [h["id"] for h in hits.json()["hits"]] != [], hits.text


def test_ready_names_the_error_class_of_an_index_that_cannot_open_not_its_text(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """/ready is public: the exception text (here a server path) stays in the log."""
    from app.indexing import manager as indexes

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post(f"{API}/collections", json={"name": "a", "embedder": "tiny"}).status_code == 201
        assert upload(client.request, "a", noise_png(1)).status_code == 201

    secret = "/srv/private-volume/cbir/indexes/collection-1.cbidx"

    def broken(self: indexes.IndexManager, collection: object) -> object:
        raise PermissionError(13, "Permission denied", secret)

    monkeypatch.setattr(indexes.IndexManager, "_open", broken)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get(f"{API}/ready")
        (problem,) = ready.json()["problems"]
        assert problem["code"] == "index_unavailable" and "PermissionError" in problem["detail"], problem
        assert "/srv" not in ready.text and "private-volume" not in ready.text, ready.text
        search = client.post(
            f"{API}/collections/a/search", files={"file": ("q.png", noise_png(1), "image/png")}
        )
        assert "/srv" not in assert_problem(search, 503, "index_unavailable")["detail"]
        index = client.get(f"{API}/collections/a/index")
        assert "/srv" not in index.text, index.text
    assert secret in caplog.text  # the operator still finds it in the log
