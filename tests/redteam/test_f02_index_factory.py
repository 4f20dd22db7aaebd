"""Finding 2: an index factory FAISS cannot build (``HNSW0`` aborted the process, and every restart
after it) is refused with 422 bad_index_factory before it is stored; a bad setting stored anyway (a
restored backup) never stops the start: the collection serves exact search and says why."""

from __future__ import annotations

import io
import signal
import sqlite3
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.helpers import assert_problem
from tests.liveserver import LiveServer, run_in_sqlite_pass_only

API = "/api/v1"
N = 301  # as in the finding: enough vectors to train IVF16 and 8-bit PQ codebooks

# Each with what the 422's detail must mention. Several of them killed the process on the old code
# (HNSW0: SIGABRT, HNSW1: SIGSEGV, PQ8x0 and OPQ8_0: SIGFPE); others were stored and failed later.
MALFORMED = {
    "HNSW0": "M",
    "HNSW1": "M",
    "HNSW100000": "M",
    "IVF0,Flat": "nlist",
    "IVF99999999,Flat": "nlist",
    "IVF16,PQ8x0": "bits",
    "IVF16,PQ8x17": "bits",
    "OPQ8_0,IVF16,PQ8": "OPQ",
    "IVF16,PQ0": "PQ",
    "IVF16,PQ3": "divide",
    "IVF16,PQ128": "PQ",
    "LSH": "supported",
    "PCA32,Flat": "supported",
    "Flat,Flat": "supported",
    "HNSW32,IVF16": "supported",
    "IVF16,Flat;drop": "supported",
    "IDMap,HNSW32": "supported",
}


def noise_png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def seed_tar(n: int = N) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for i in range(n):
            data = noise_png(i)
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def wait_until(condition, *, timeout: float = 120.0, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.1)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[list[LiveServer]]:
    run_in_sqlite_pass_only()
    started: list[LiveServer] = []
    yield started
    for server in started:
        server.kill()


def _server(tmp_path: Path) -> LiveServer:
    env = {"CBIR_IMPORT_PROCESSES": "0", "CBIR_DEFAULT_EMBEDDER": "tiny"}
    return LiveServer(tmp_path / "data", tmp_path / "server.log", env=env)


def _seeded(server: LiveServer) -> None:
    assert server.api("POST", "/collections", json={"name": "k", "embedder": "tiny"}).status_code == 201
    response = server.api("POST", "/collections/k/imports", files={"file": ("seed.tar", seed_tar())})
    assert response.status_code == 202, response.text
    job = response.json()["job_id"]
    wait_until(lambda: server.api("GET", f"/jobs/{job}").json()["state"] == "succeeded", what="the import")
    assert server.api("GET", "/collections/k").json()["index_size"] == N


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_malformed_factories_are_refused_and_a_stored_one_never_stops_the_restart(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    server = _server(tmp_path)
    live.append(server.start())
    _seeded(server)

    for factory, reason in MALFORMED.items():
        response = server.api("PUT", "/collections/k/index", json={"factory": factory})
        body = assert_problem(response, 422, "bad_index_factory")
        assert reason in body["detail"], (factory, body["detail"])
        assert server.api("GET", "/health").status_code == 200, (
            f"the server died on {factory}:\n{server.tail()}"
        )
        assert server.api("GET", "/collections/k/index").json()["factory"] == "auto", factory
    query = {"file": ("q.png", noise_png(5), "image/png")}
    assert server.api("POST", "/collections/k/search", files=query).json()["hits"][0]["score"] > 0.9999
    server.stop()

    # A bad kind and bad search parameters stored straight into the database (a restored backup).
    with sqlite3.connect(server.data_dir / "cbir.sqlite3") as db:
        db.execute(
            "update collections set index_factory = 'HNSW0', index_params = ? where name = 'k'",
            ('{"ef_search": "many", "nprobe": -3}',),
        )
    server = _server(tmp_path)
    live.append(server.start())
    ready = server.api("GET", "/ready")
    assert ready.status_code == 200, ready.text
    codes = {(p["collection"], p["code"]) for p in ready.json()["problems"]}
    assert {("k", "bad_index_factory"), ("k", "bad_index_params")} <= codes, ready.json()
    health = server.api("GET", "/health").json()
    assert health["status"] == "degraded" and "bad_index_factory" in health["degraded"], health
    index = server.api("GET", "/collections/k/index").json()
    assert index["factory"] == "HNSW0" and index["kind"] == "Flat" and index["ntotal"] == N, index
    assert "HNSW0" in index["last_error"] and "exact" in index["last_error"], index
    hits = server.api("POST", "/collections/k/search", files=query).json()["hits"]
    assert hits[0]["score"] > 0.9999

    # Setting a valid kind clears the problem.
    assert server.api("PUT", "/collections/k/index", json={"factory": "Flat"}).status_code in (200, 202)
    wait_until(lambda: server.api("GET", "/collections/k/index").json()["state"] == "ready", what="the build")
    assert not [p for p in server.api("GET", "/ready").json()["problems"] if p["code"] == "bad_index_factory"]
    server.stop()
    assert server.process is not None and server.process.returncode in (0, -signal.SIGTERM)


GOOD = [
    "Flat",
    "HNSW32",
    "IVF16,Flat",
    "IVF16,SQ8",
    "IVF16,PQ8",
    "IVF16,PQ16x4",
    "OPQ8,IVF16,PQ8",
    "IVF16,PQ8,RFlat",
]


@pytest.mark.slow
def test_the_supported_kinds_are_accepted_and_built(client: TestClient, collection: str) -> None:
    from app.services.ingest import Item, ingest_batch

    ctx = client.app.state.context  # type: ignore[attr-defined]
    results = ingest_batch(
        ctx, collection=collection, items=[Item(f"{i}.png", noise_png(i)) for i in range(N)]
    )
    assert all(r.status == "added" for r in results)
    for factory in GOOD:
        response = client.put(f"{API}/collections/{collection}/index", json={"factory": factory})
        assert response.status_code in (200, 202), (factory, response.text)
        wait_until(
            lambda: client.get(f"{API}/collections/{collection}/index").json()["state"] == "ready",
            what=f"the {factory} build",
        )
        index = client.get(f"{API}/collections/{collection}/index").json()
        assert (index["kind"], index["ntotal"], index["last_error"]) == (factory, N, None), index
