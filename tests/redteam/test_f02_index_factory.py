"""Finding 2: an index factory FAISS cannot build (``HNSW0`` aborted the process, and every restart
after it) is refused with 422 bad_index_factory before it is stored; a bad setting stored anyway (a
restored backup) never stops the start: the collection serves exact search and says why."""

from __future__ import annotations

import io
import signal
import sqlite3
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.helpers import assert_problem
from tests.liveserver import LiveServer
from tests.redteam.conftest import tiny_server

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
    "PCA128,Flat": "PCA",
    "HNSW32_PQ8": "L2",
    "PQ16": "IVF",
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
    server = tiny_server(tmp_path)
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
    server = tiny_server(tmp_path)
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
    from app.ingest.store import Item, ingest_batch

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


# -- round 2: the kinds FAISS built before are kept; costs are bounded by the collection ---------------
def clustered(n: int, *, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    rows = centres[rng.integers(0, 30, size=n)] + rng.normal(scale=0.35, size=(n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _record(client: TestClient, name: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from app.data.records import CollectionRecord

    with client.app.state.context.db.session() as session:  # type: ignore[attr-defined]
        return session.scalar(select(CollectionRecord).where(CollectionRecord.name == name))


def _seed(client: TestClient, name: str, n: int) -> np.ndarray:
    """A ``tiny`` collection of ``n`` synthetic rows (no files), its index caught up with them."""
    from tests.synthetic import insert_synthetic

    assert client.post(f"{API}/collections", json={"name": name, "embedder": "tiny"}).status_code == 201
    ctx = client.app.state.context  # type: ignore[attr-defined]
    record = _record(client, name)
    vectors = clustered(n, seed=len(name))
    ids = insert_synthetic(
        ctx.db,
        collection_id=record.id,
        vectors=vectors,
        embedder=record.embedder,
        embedder_version=record.embedder_version,
        tag=name,
    )
    ctx.indexes.add(record, vectors=vectors, ids=ids)
    return ids


def _index(client: TestClient, name: str) -> dict:
    response = client.get(f"{API}/collections/{name}/index")
    assert response.status_code == 200, response.text
    return response.json()


def _settled(client: TestClient, name: str, *, timeout: float = 60.0) -> dict:
    wait_until(lambda: _index(client, name)["state"] == "ready", timeout=timeout, what=f"the {name} build")
    return _index(client, name)


# Strings an older version stored (it took any string FAISS parsed), each of a kind FAISS builds
# and serves safely: exact search after an upgrade would be a silent loss.
EARLIER = {
    "hnsw": "HNSW32,Flat",
    "hnswsq": "HNSW32_SQ8",
    "fastscan": "IVF1024,PQ32x4fs",
    "pca": "PCA64,IVF256,Flat",
}


def test_the_kinds_faiss_built_before_are_accepted_and_kept_across_a_restart(settings) -> None:  # type: ignore[no-untyped-def]
    from app.main import create_app

    first: dict[str, int] = {}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for name, factory in EARLIER.items():
            ids = _seed(client, name, 1100)  # enough to train 1024 lists
            first[name] = int(ids[0])
            response = client.put(f"{API}/collections/{name}/index", json={"factory": factory})
            assert response.status_code == 202, (factory, response.text)
            index = _settled(client, name)
            assert (index["kind"], index["ntotal"], index["last_error"]) == (factory, len(ids), None), index
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:  # a restart
        for name, factory in EARLIER.items():
            index = _settled(client, name)
            assert (index["kind"], index["factory"], index["problems"]) == (factory, factory, []), index
            hits = client.get(f"{API}/collections/{name}/images/{first[name]}/similar", params={"k": 5})
            assert hits.status_code == 200 and len(hits.json()["hits"]) == 5, hits.text
        assert not client.get(f"{API}/ready").json()["problems"]


def test_a_stored_kind_cbir_no_longer_builds_keeps_serving_its_file(settings) -> None:  # type: ignore[no-untyped-def]
    """HNSW512 was accepted by the previous grammar (M up to 512); its file opens and serves as it
    is, reported as advice, instead of being rebuilt into exact search at the first start."""
    from sqlalchemy import update

    from app.data.records import CollectionRecord
    from app.data.vector_rows import load_vectors
    from app.main import create_app
    from index.kinds import build_index

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ids = _seed(client, "old", 300)
        ctx = client.app.state.context  # type: ignore[attr-defined]
        record = _record(client, "old")
        vectors, stored = load_vectors(
            ctx.db, collection_id=record.id, embedder_version=record.embedder_version
        )
        meta = {"collection": "old", "embedder_version": record.embedder_version}
        path = ctx.indexes.path_for(record.id)
        with ctx.db.transaction() as session:
            session.execute(
                update(CollectionRecord)
                .where(CollectionRecord.id == record.id)
                .values(index_factory="HNSW512")
            )
    # What the older version left: the setting, and a file of exactly that kind.
    build_index(vectors, stored, factory="HNSW512", meta=meta).save(path)

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        index = _index(client, "old")
        assert (index["state"], index["kind"], index["ntotal"]) == ("ready", "HNSW512", len(ids)), index
        (problem,) = index["problems"]
        assert problem["code"] == "bad_index_factory" and "serves as it is" in problem["detail"], problem
        hits = client.get(f"{API}/collections/old/images/{int(ids[3])}/similar", params={"k": 5})
        assert hits.status_code == 200, hits.text
        upload = client.post(
            f"{API}/collections/old/images", files={"file": ("n.png", noise_png(1), "image/png")}
        )
        assert upload.status_code == 201, upload.text
        index = _index(client, "old")
        assert (index["state"], index["kind"], index["ntotal"]) == ("ready", "HNSW512", len(ids) + 1), index
        # Setting a kind cbir builds replaces it, and the advice goes.
        assert client.put(f"{API}/collections/old/index", json={"factory": "HNSW32"}).status_code == 202
        index = _settled(client, "old")
        assert (index["kind"], index["problems"]) == ("HNSW32", []), index


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        ("HNSW512", "HNSW M"),  # the graph outweighs the vectors many times over
        ("OPQ8_4096,IVF16,PQ8", "exceeds"),  # a 4096x4096 rotation learnt for 64-d vectors
        ("PCA128,IVF16,Flat", "exceeds"),
        ("IVF65536,Flat", "301"),  # lists for 65,536 vectors over a collection of 301
        ("IVF32768,PQ8", "301"),
    ],
)
def test_a_factory_whose_cost_is_out_of_proportion_is_refused(
    client: TestClient, factory: str, reason: str
) -> None:
    _seed(client, "k", 301)
    body = assert_problem(
        client.put(f"{API}/collections/k/index", json={"factory": factory}), 422, "bad_index_factory"
    )
    assert reason in body["detail"], body
    assert _index(client, "k")["factory"] == "auto"


def test_a_kind_set_ahead_of_its_vectors_serves_exact_search_until_they_exist(client: TestClient) -> None:
    assert client.post(f"{API}/collections", json={"name": "e", "embedder": "tiny"}).status_code == 201
    assert_problem(
        client.put(f"{API}/collections/e/index", json={"factory": "IVF16384,Flat"}), 422, "bad_index_factory"
    )
    _seed(client, "k", 301)
    assert client.put(f"{API}/collections/k/index", json={"factory": "IVF1024,Flat"}).status_code in (
        200,
        202,
    )
    index = _settled(client, "k")
    assert (index["factory"], index["kind"], index["ntotal"]) == ("IVF1024,Flat", "Flat", 301), index


def test_an_upload_does_not_check_the_factory_again(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check builds an empty FAISS index; it is made once per kind and dimension, never per upload."""
    import index.kinds

    _seed(client, "k", 50)
    assert client.put(f"{API}/collections/k/index", json={"factory": "HNSW16"}).status_code == 202
    assert _settled(client, "k")["kind"] == "HNSW16"
    calls: list[str] = []
    real = index.kinds.validate_factory

    def counted(factory: str, *, dim: int | None) -> str:
        calls.append(factory)
        return real(factory, dim=dim)

    monkeypatch.setattr(index.kinds, "validate_factory", counted)
    monkeypatch.setattr("app.indexing.problems.validate_factory", counted)
    for seed in range(5):
        response = client.post(
            f"{API}/collections/k/images", files={"file": ("a.png", noise_png(seed), "image/png")}
        )
        assert response.status_code == 201, response.text
    assert calls == [], calls
    assert _index(client, "k")["ntotal"] == 55


def test_a_kind_set_while_a_rebuild_runs_is_built_after_it(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from app.indexing import builds

    _seed(client, "k", 300)
    gate = threading.Event()
    real = builds.load_vectors

    def slow_load(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        gate.wait(30)
        return result

    monkeypatch.setattr(builds, "load_vectors", slow_load)
    assert client.put(f"{API}/collections/k/index", json={"factory": "HNSW32"}).status_code == 202
    second = client.put(f"{API}/collections/k/index", json={"factory": "IVF16,Flat"})
    assert second.status_code == 202, second.text
    rebuild = second.json()["rebuild"]
    assert rebuild["target"] == "HNSW32" and "IVF16,Flat" in rebuild["queued"], rebuild
    gate.set()
    wait_until(
        lambda: _index(client, "k")["kind"] == "IVF16,Flat", timeout=60, what="the second kind's build"
    )
    index = _settled(client, "k")
    assert (index["factory"], index["kind"], index["ntotal"], index["last_error"]) == (
        "IVF16,Flat",
        "IVF16,Flat",
        300,
        None,
    )
