"""Section F of the reliability plan: consistency, crashes and recovery.

Most tests run a real server (tests/liveserver.py), make it die at a named crash point
(``CBIR_FAULT_CRASH_AT``, app/core/faults.py) or kill -9 it, start it again without the fault and check
the state: the database is the truth, and the index, the files and the jobs agree with it.

Plan names mapped to ours: ``FAULT_CRASH_AT`` is ``CBIR_FAULT_CRASH_AT``; ``index_state.hwm_id`` is
the ``hwm`` in the index file's own header (written atomically with the vectors); ``/admin/stats``
is ``GET /collections/{name}`` (``image_count``, ``index_size``) plus the SQLite file itself;
``/ready`` is ``GET /api/v1/ready``; ``model_id`` is the index file's ``embedder_version``; the
delete path's "tombstone" is the committed row delete.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.catalog.collections import create_collection, require_collection
from app.context import open_context
from app.core import faults
from app.core.settings import Settings
from app.data.vector_rows import load_vectors
from app.ingest.store import Item, ingest_batch
from index import VectorIndex
from tests.api.helpers import assert_problem
from tests.liveserver import LiveServer, run_in_sqlite_pass_only

API = "/api/v1"
NAME = "k"
EMBEDDER_DIM = 64  # the tiny embedder: 8x8 grey
FINAL_STATES = ("succeeded", "failed", "cancelled")


# -- fixtures and helpers ------------------------------------------------------------------------
def png(seed: int, size: int = 28) -> bytes:
    """A unique noise PNG per seed (unique tiny-embedder vector too, with overwhelming odds)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def server_for(tmp_path: Path, **env: str) -> LiveServer:
    base = {"CBIR_IMPORT_PROCESSES": "0", "CBIR_DEFAULT_EMBEDDER": "tiny"}
    return LiveServer(tmp_path / "data", tmp_path / "server.log", env={**base, **env})


def with_env(server: LiveServer, **env: str) -> LiveServer:
    """The same data folder and log, other variables (a fault set, or cleared)."""
    base = {k: v for k, v in server.env.items() if not k.startswith("CBIR_FAULT_")}
    return LiveServer(server.data_dir, server.log, env={**base, **env})


@pytest.fixture
def live(tmp_path: Path) -> Iterator[list[LiveServer]]:
    """Servers a test starts: whatever still runs at the end is killed."""
    run_in_sqlite_pass_only()
    started: list[LiveServer] = []
    yield started
    for server in started:
        server.kill()


def start(live: list[LiveServer], server: LiveServer) -> LiveServer:
    live.append(server)
    return server.start()


def upload(server: LiveServer, data: bytes, name: str = "a.png") -> httpx.Response:
    return server.api("POST", f"/collections/{NAME}/images", files={"file": (name, data, "image/png")})


def search(server: LiveServer, data: bytes, k: int = 1) -> httpx.Response:
    return server.api(
        "POST", f"/collections/{NAME}/search", params={"k": k}, files={"file": ("q.png", data, "image/png")}
    )


def died_of_sigkill(server: LiveServer, timeout: float = 30.0) -> bool:
    assert server.process is not None
    try:
        return server.process.wait(timeout=timeout) == -signal.SIGKILL
    except Exception:
        return False


def db_rows(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "cbir.sqlite3") as db:
        (images,) = db.execute("select count(*) from images").fetchone()
        (distinct,) = db.execute("select count(distinct sha256) from images").fetchone()
        (vectors,) = db.execute("select count(*) from embeddings").fetchone()
        (max_id,) = db.execute("select coalesce(max(id), -1) from images").fetchone()
    return {"images": images, "distinct": distinct, "vectors": vectors, "max_id": max_id}


def ids_by_sha(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "cbir.sqlite3") as db:
        return dict(db.execute("select sha256, id from images").fetchall())


def index_file(data_dir: Path) -> Path:
    return data_dir / "indexes" / "collection-1.cbidx"


def temp_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*.tmp")]


def assert_consistent(server: LiveServer, images: dict[int, bytes], *, queries: int | None = None) -> None:
    """Rows == vectors == index size == the expected images, each (or a seeded sample of
    ``queries``) found by its own bytes top-1 at distance ~0."""
    rows = db_rows(server.data_dir)
    assert rows["images"] == rows["distinct"] == rows["vectors"] == len(images), rows
    info = server.api("GET", f"/collections/{NAME}").json()
    assert info["image_count"] == info["index_size"] == len(images), info
    status = server.api("GET", f"/collections/{NAME}/index").json()
    assert status["ntotal"] == len(images) and status["state"] == "ready", status
    chosen = list(images.items())
    if queries is not None and queries < len(chosen):
        chosen = random.Random(0).sample(chosen, queries)
    for image_id, data in chosen:
        response = search(server, data)
        assert response.status_code == 200, response.text
        (hit,) = response.json()["hits"]
        assert hit["id"] == image_id and hit["score"] >= 0.9999, (image_id, hit)


def create(server: LiveServer) -> None:
    response = server.api("POST", "/collections", json={"name": NAME, "embedder": "tiny"})
    assert response.status_code == 201, response.text


def seeded_collection(live: list[LiveServer], tmp_path: Path, n: int, **env: str) -> dict[int, bytes]:
    """A collection of ``n`` images, the server stopped cleanly (final checkpoint written)."""
    server = start(live, server_for(tmp_path, **env))
    create(server)
    images = {}
    for seed in range(n):
        response = upload(server, png(seed))
        assert response.status_code == 201, response.text
        images[response.json()["id"]] = png(seed)
    server.stop()
    # uvicorn re-raises the SIGTERM it handled once shut down (`cbir serve` turns that into 0: r51)
    assert server.process is not None and server.process.returncode in (0, -signal.SIGTERM)
    return images


# -- 42: idempotent re-upload ---------------------------------------------------------------------
@pytest.mark.fault
@pytest.mark.timeout(180)
def test_r42_same_bytes_uploaded_twice_then_by_8_threads_make_one_row(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    server = start(live, server_for(tmp_path))
    create(server)
    data = png(42)
    first, second = upload(server, data), upload(server, data)
    assert (first.status_code, first.json()["created"]) == (201, True), first.text
    assert (second.status_code, second.json()["created"]) == (200, False), second.text

    other = png(4242)  # never stored before: the 8 threads race to create it
    barrier = threading.Barrier(8)

    def racer(_: int) -> httpx.Response:
        barrier.wait()
        return upload(server, other)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(racer, range(8)))
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert sum(r.json()["created"] for r in responses) == 1
    assert len({r.json()["id"] for r in responses}) == 1
    assert second.json()["id"] == first.json()["id"] != responses[0].json()["id"]
    assert_consistent(server, {first.json()["id"]: data, responses[0].json()["id"]: other})


# -- 54: NaN embedding ----------------------------------------------------------------------------
def test_r54_nan_embedding_is_a_422_degenerate_image_that_writes_nothing(
    client: TestClient, collection: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = client.app.state.context  # type: ignore[attr-defined]
    embedder = ctx.embedders.get("tiny")
    real = embedder.embed_prepared
    calls = {"n": 0}

    def nan_once(prepared: list) -> np.ndarray:
        vectors = real(prepared)
        calls["n"] += 1
        if calls["n"] == 1:
            vectors = vectors.copy()
            vectors[0, 3] = np.nan
        return vectors

    monkeypatch.setattr(embedder, "embed_prepared", nan_once)
    data = png(54)
    response = client.post(f"{API}/collections/{collection}/images", files={"file": ("a.png", data)})
    assert_problem(response, 422, "degenerate_image")  # no index could hold it (tests/redteam/test_f01)
    assert calls["n"] == 1
    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["index_size"] == 0
    assert not [p for p in settings.images_dir.rglob("*") if p.is_file()], "a file of the failed upload"

    again = client.post(f"{API}/collections/{collection}/images", files={"file": ("a.png", data)})
    assert again.status_code == 201, again.text
    hits = client.post(f"{API}/collections/{collection}/search", files={"file": ("q.png", data)}).json()
    assert hits["hits"][0]["id"] == again.json()["id"] and hits["hits"][0]["score"] > 0.9999


# -- 44: deterministic crash points ---------------------------------------------------------------
def test_r44_crash_points_are_named_and_checked_at_start(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    monkeypatch.setenv(faults.CRASH_ENV, "after_hwm:3")
    faults.reset()
    try:
        faults.crash_point("after_hwm")  # passes 1 and 2 of 3: still alive
        faults.crash_point("after_hwm")
        faults.crash_point("during_write_index")  # another point: not counted
        assert faults._passes == {"after_hwm": 2}
        for bad in ("after_hmw", "after_hwm:0", "after_hwm:x"):
            monkeypatch.setenv(faults.CRASH_ENV, bad)
            faults.reset()
            with pytest.raises(SystemExit, match=faults.CRASH_ENV):
                open_context(settings)  # a typo fails the start, not silently never firing
        monkeypatch.setenv(faults.CRASH_ENV, "")
        monkeypatch.setenv(faults.DELAY_ENV, "index_build:x")
        faults.reset()
        with pytest.raises(SystemExit, match=faults.DELAY_ENV):
            faults.check()
    finally:
        monkeypatch.delenv(faults.CRASH_ENV)
        monkeypatch.delenv(faults.DELAY_ENV, raising=False)
        faults.reset()


# The pass at which each point fires. Creating the collection writes its first (empty) checkpoint,
# so a save point's pass 2 is the first checkpoint holding images and pass 3 overwrites one.
CRASH_PLANS = {
    "after_db_commit_before_faiss_add": 3,
    "after_faiss_add_before_response": 3,
    "during_write_index": 3,
    "after_replace_before_hwm": 2,
    "after_hwm": 2,
}


def upload_until_killed(server: LiveServer, *, first_seed: int, limit: float = 30.0) -> tuple[dict, list]:
    """Upload new images one by one until the server dies: (acknowledged {id: bytes}, seeds whose
    request got no answer)."""
    acknowledged: dict[int, bytes] = {}
    unanswered: list[int] = []
    deadline = time.monotonic() + limit
    seed = first_seed
    assert server.process is not None
    while server.process.poll() is None:
        assert time.monotonic() < deadline, f"the crash point never fired:\n{server.tail()}"
        try:
            response = upload(server, png(seed))
        except httpx.TransportError:
            unanswered.append(seed)
        else:
            assert response.status_code == 201, response.text
            acknowledged[response.json()["id"]] = png(seed)
        seed += 1
        time.sleep(0.25)
    return acknowledged, unanswered


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", list(CRASH_PLANS))
def test_r44_crash_point_leaves_a_state_that_restarts_consistent(
    point: str, tmp_path: Path, live: list[LiveServer]
) -> None:
    server = start(live, server_for(tmp_path, CBIR_FAULT_CRASH_AT=f"{point}:{CRASH_PLANS[point]}"))
    create(server)
    acknowledged, unanswered = upload_until_killed(server, first_seed=440)
    assert died_of_sigkill(server), server.tail()
    data_dir = server.data_dir

    # The live index file is the old one intact or the new one complete: never torn.
    on_disk = VectorIndex.load(index_file(data_dir))
    stored = ids_by_sha(data_dir)
    assert set(on_disk.ids().tolist()) <= set(stored.values())
    assert on_disk.high_water_mark == (max(on_disk.ids().tolist()) if on_disk.ntotal else -1)
    if point == "during_write_index":
        assert temp_files(data_dir), "the crash should have left the half-written checkpoint"
    if point in ("after_replace_before_hwm", "after_hwm"):
        assert on_disk.ntotal >= 1, "the checkpoint that was renamed into place holds the images"

    server = start(live, with_env(server))
    assert not temp_files(data_dir), "a half-written checkpoint outlived the restart"
    expected = dict(acknowledged)
    from app.data.storage import sha256_hex

    for seed in unanswered:  # committed or not: either way the database decides, exactly once
        image_id = stored.get(sha256_hex(png(seed)))
        if image_id is not None:
            expected[image_id] = png(seed)
    assert_consistent(server, expected)
    for seed in unanswered:  # the client's retry is idempotent: the same id, or a first store
        response = upload(server, png(seed))
        assert response.status_code in (200, 201), response.text
        expected[response.json()["id"]] = png(seed)
        if response.status_code == 200:
            assert response.json()["id"] == stored[sha256_hex(png(seed))]
    assert_consistent(server, expected)
    server.stop()
    final = VectorIndex.load(index_file(data_dir))
    assert sorted(final.ids().tolist()) == sorted(expected)  # no id added twice, none lost
    assert final.high_water_mark == db_rows(data_dir)["max_id"]


# -- 49: crash during delete ----------------------------------------------------------------------
@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_r49_crash_between_delete_commit_and_index_removal(tmp_path: Path, live: list[LiveServer]) -> None:
    server = start(live, server_for(tmp_path, CBIR_FAULT_CRASH_AT="after_db_tombstone_before_remove_ids"))
    create(server)
    images = {}
    for seed in range(490, 495):
        response = upload(server, png(seed))
        assert response.status_code == 201, response.text
        images[response.json()["id"]] = png(seed)
    data_dir = server.data_dir
    deadline = time.monotonic() + 30  # until a checkpoint holds them all (the saver runs every 2 s)
    while not index_file(data_dir).exists() or VectorIndex.load(index_file(data_dir)).ntotal < len(images):
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.2)
    victim = min(images)
    victim_file = next(
        p for p in (data_dir / "images").rglob("*.png") if p.stem in ids_by_sha_inv(data_dir, victim)
    )

    with pytest.raises(httpx.TransportError):
        server.api("DELETE", f"/images/{victim}")
    assert died_of_sigkill(server), server.tail()
    assert victim_file.exists() and VectorIndex.load(index_file(data_dir)).contains(victim)

    server = start(live, with_env(server))
    assert server.api("GET", f"/images/{victim}").status_code == 404
    ids = [hit["id"] for hit in search(server, images[victim], k=10).json()["hits"]]
    assert victim not in ids and len(ids) == len(images) - 1
    assert not victim_file.exists(), "the deleted image's file outlived the restart"
    del images[victim]
    assert_consistent(server, images)


def ids_by_sha_inv(data_dir: Path, image_id: int) -> set[str]:
    return {sha for sha, i in ids_by_sha(data_dir).items() if i == image_id}


# -- 45, 46: torn, garbage or missing index file ---------------------------------------------------
REBUILD_ENV = {
    # Every rebuild runs in the background, held open 5 s, so the window is there to observe.
    "CBIR_INDEX_SYNC_REBUILD_MAX": "0",
    "CBIR_FAULT_DELAY_AT": "index_build:5",
}


def assert_rebuilt_in_the_background(server: LiveServer, images: dict[int, bytes]) -> None:
    """Not ready and 503 index_rebuilding (Retry-After) until the rebuild ends, never an empty
    answer; then ready and consistent."""
    ready = server.api("GET", "/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False, ready.text
    assert NAME in ready.json()["rebuilding"] and ready.headers.get("Retry-After")
    some_id, some_data = next(iter(images.items()))
    refused = 0
    deadline = time.monotonic() + 90
    while (ready := server.api("GET", "/ready")).status_code == 503:
        assert time.monotonic() < deadline, server.tail()
        response = search(server, some_data, k=3)
        if response.status_code == 503:
            assert_problem(response, 503, "index_rebuilding")
            assert int(response.headers["Retry-After"]) > 0
            refused += 1
        else:  # the rebuild ended between the two requests: a full answer, never an empty one
            assert response.status_code == 200 and response.json()["hits"][0]["id"] == some_id
        time.sleep(0.2)
    assert refused >= 1
    assert ready.json() == {"ready": True, "rebuilding": {}, "problems": []}
    assert_consistent(server, images)


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_r45_torn_or_garbage_index_file_is_set_aside_and_rebuilt(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    images = seeded_collection(live, tmp_path, 30)
    path = index_file(tmp_path / "data")
    for damage in ("torn", "garbage"):
        whole = path.read_bytes()
        bad = whole[: len(whole) // 2] if damage == "torn" else np.random.default_rng(45).bytes(len(whole))
        path.write_bytes(bad)
        server = start(live, server_for(tmp_path, **REBUILD_ENV))
        assert path.with_suffix(".corrupt").read_bytes() == bad, f"{damage}: not set aside"
        assert_rebuilt_in_the_background(server, images)
        server.stop()
        assert sorted(VectorIndex.load(path).ids().tolist()) == sorted(images)
    assert "the index file is unreadable" in server.tail(20_000)


@pytest.mark.fault
@pytest.mark.timeout(240)
def test_r46_missing_index_file_with_rows_is_rebuilt_from_the_database(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    images = seeded_collection(live, tmp_path, 20)
    index_file(tmp_path / "data").unlink()
    server = start(live, server_for(tmp_path, **REBUILD_ENV))
    assert_rebuilt_in_the_background(server, images)
    server.stop()
    assert sorted(VectorIndex.load(index_file(tmp_path / "data")).ids().tolist()) == sorted(images)


# -- 47: index of another model or dimension --------------------------------------------------------
@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_r47_index_of_another_model_is_refused_and_rebuilt_or_503(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    images = seeded_collection(live, tmp_path, 12)
    data_dir = tmp_path / "data"
    vectors = np.random.default_rng(47).standard_normal((len(images), 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    foreign = VectorIndex.build(
        vectors, np.asarray(list(images), dtype=np.int64), meta={"embedder_version": "other"}
    )
    foreign.save(index_file(data_dir))

    server = start(live, server_for(tmp_path))
    assert "not loaded: the file holds embedder version 'other'" in server.tail(20_000)
    assert_consistent(server, images)  # rebuilt from the database's own vectors
    assert server.api("GET", f"/collections/{NAME}/index").json()["dim"] == EMBEDDER_DIM
    server.stop()
    rebuilt = VectorIndex.load(index_file(data_dir))
    assert rebuilt.dim == EMBEDDER_DIM and rebuilt.meta["embedder_version"] == "tiny-v1"

    # The database holds no vector of the configured version: the file (of that version) is not
    # served either, and nothing is mixed: 503 reembed_required until re-embedded.
    with sqlite3.connect(data_dir / "cbir.sqlite3") as db:
        db.execute("update embeddings set embedder_version = 'tiny-v0'")
    server = start(live, server_for(tmp_path))
    assert_problem(search(server, next(iter(images.values()))), 503, "reembed_required")
    assert server.api("GET", f"/collections/{NAME}").json()["index_size"] == 0
    response = server.api("PUT", f"/collections/{NAME}/embedder", json={"embedder": "tiny"})
    assert response.status_code == 202, response.text
    job = wait_job(server, response.json()["job_id"])
    assert job["state"] == "succeeded", job
    assert_consistent(server, images)


def wait_job(server: LiveServer, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while (job := server.api("GET", f"/jobs/{job_id}").json())["state"] not in FINAL_STATES:
        assert time.monotonic() < deadline, (job, server.tail())
        time.sleep(0.2)
    return job


# -- 50: a bulk job interrupted by a crash ----------------------------------------------------------
def submit_archive(server: LiveServer, data: bytes, name: str = "batch.tar") -> str:
    response = server.api(
        "POST", f"/collections/{NAME}/imports", files={"file": (name, data, "application/x-tar")}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def job_of(server: LiveServer, job_id: str) -> dict:
    response = server.api("GET", f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_r50_job_killed_mid_import_reports_its_resume_and_a_resubmission_adds_nothing(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    # 700 members: three commits of at most 256 (the pipeline's chunk).
    members = [(f"img/{seed}.png", png(seed, size=8)) for seed in range(5000, 5700)]
    archive = tar_of(members)
    # Dies right after the second batch's commit: mid-job, deterministically.
    env = {"CBIR_IMPORT_BATCH_SIZE": "256", "CBIR_FAULT_CRASH_AT": "after_db_commit_before_faiss_add:2"}
    server = start(live, server_for(tmp_path, **env))
    create(server)
    job_id = submit_archive(server, archive)
    assert died_of_sigkill(server, timeout=60), server.tail()
    with sqlite3.connect(server.data_dir / "cbir.sqlite3") as db:
        state, cursor = db.execute("select state, cursor from jobs where id = ?", (job_id,)).fetchone()
    assert state == "running" and 0 < cursor < len(members)  # what a crash leaves behind

    server = start(live, with_env(server))
    job = wait_job(server, job_id)
    # Plan: "interrupted, not running for ever". Ours resumes by itself at its committed cursor and
    # says so: resumes counts the interruptions; the counts are exact, nothing read twice.
    assert job["state"] == "succeeded" and job["resumes"] == 1, job
    assert (job["done"], job["added"], job["duplicates"], job["failed"]) == (len(members), len(members), 0, 0)
    report = server.api("GET", f"/jobs/{job_id}/report").text.splitlines()
    assert len(report) == len(members)

    again = wait_job(server, submit_archive(server, archive))  # the client re-submits the same payload
    assert again["state"] == "succeeded", again
    assert (again["added"], again["duplicates"], again["resumes"]) == (0, len(members), 0)
    ids = ids_by_sha(server.data_dir)
    from app.data.storage import sha256_hex

    assert_consistent(server, {ids[sha256_hex(data)]: data for _, data in members}, queries=100)


# -- 51: graceful shutdown ------------------------------------------------------------------------
def serve_cli(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """`cbir serve` (the Docker command), not bare uvicorn: its exit status is what is checked."""
    from tests.liveserver import ROOT, server_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path / "cli.log", "ab")  # noqa: SIM115 - the child writes it while it lives
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=server_env(tmp_path / "data", **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (tmp_path / "cli.log").read_text()
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (tmp_path / "cli.log").read_text()
        time.sleep(0.1)


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_r51_sigterm_mid_import_checkpoints_and_exits_0(tmp_path: Path, live: list[LiveServer]) -> None:
    members = [(f"img/{seed}.png", png(seed, size=8)) for seed in range(5100, 6124)]
    env = {
        "CBIR_IMPORT_PROCESSES": "0",
        "CBIR_IMPORT_BATCH_SIZE": "256",
        "CBIR_FAULT_DELAY_AT": "store_batch:1",  # a slow disk: 4 commits of 256 take 4 s at least
    }
    process, url = serve_cli(tmp_path, **env)
    try:
        api = f"{url}/api/v1"
        assert httpx.post(f"{api}/collections", json={"name": NAME, "embedder": "tiny"}).status_code == 201
        response = httpx.post(
            f"{api}/collections/{NAME}/imports",
            files={"file": ("a.tar", tar_of(members), "application/x-tar")},
            timeout=60,
        )
        job_id = response.json()["job_id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{api}/jobs/{job_id}").json()["done"] < 256:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert process.wait(timeout=30) == 0, (tmp_path / "cli.log").read_text()[-3000:]
        took = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
    data_dir = tmp_path / "data"
    rows = db_rows(data_dir)
    with sqlite3.connect(data_dir / "cbir.sqlite3") as db:
        state, cursor, done, added = db.execute(
            "select state, cursor, done, added from jobs where id = ?", (job_id,)
        ).fetchone()
    # Stopped after the batch in flight, mid-job and resumable: every committed member counted once.
    assert state == "running" and cursor == done == added == rows["images"] < len(members), (state, done)
    checkpoint = VectorIndex.load(index_file(data_dir))  # the final checkpoint holds every row
    assert checkpoint.ntotal == rows["images"] and checkpoint.high_water_mark == rows["max_id"]
    assert not temp_files(data_dir)
    assert took < 20, f"shutdown took {took:.1f} s"

    server = start(live, server_for(tmp_path))
    job = wait_job(server, job_id)
    assert job["state"] == "succeeded" and job["added"] == len(members) and job["resumes"] == 1, job
    assert db_rows(data_dir)["images"] == len(members)


# -- 43: kill -9 at random moments during bulk indexing --------------------------------------------
@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_r43_kill_9_at_random_moments_during_bulk_indexing_ends_exact(
    tmp_path: Path, live: list[LiveServer]
) -> None:
    rng = random.Random(43)
    archives = [[(f"a{a}/{i:02d}.png", png(43_000 + 50 * a + i)) for i in range(50)] for a in range(6)]
    payloads = [tar_of(members) for members in archives]
    by_name = {name: data for members in archives for name, data in members}
    # A slow disk (2 s per commit) so that the kills land inside jobs as well as between them.
    server = start(live, server_for(tmp_path, CBIR_FAULT_DELAY_AT="store_batch:2"))
    create(server)
    data_dir = server.data_dir
    jobs: dict[int, str] = {}  # archive -> its latest job
    finished: set[int] = set()
    acknowledged: dict[str, int] = {}  # member name -> image id, from reports read before a kill
    kills = killed_mid_job = 0

    def client_round() -> None:
        """Note what the server has acknowledged; re-submit archives whose job is gone or failed."""
        for a, payload in enumerate(payloads):
            if a in finished:
                continue
            job = job_of(server, jobs[a]) if a in jobs else None
            if job is not None:
                for line in server.api("GET", f"/jobs/{jobs[a]}/report").text.splitlines():
                    entry = json.loads(line)
                    if entry["status"] == "added":
                        acknowledged[entry["item"]] = entry["image_id"]
            if job is not None and job["state"] == "succeeded":
                finished.add(a)
            elif job is None or job["state"] in ("failed", "cancelled"):
                jobs[a] = submit_archive(server, payload, name=f"a{a}.tar")

    while True:
        client_round()
        if len(finished) == len(payloads) or kills == 20:
            break
        time.sleep(rng.uniform(0.2, 3.0))
        if server.api("GET", "/health").status_code != 200:
            continue
        client_round()  # the last acknowledgements before the kill
        running = any(job_of(server, j)["state"] == "running" for j in jobs.values())
        server.kill()
        kills += 1
        killed_mid_job += running
        server = start(live, with_env(server, CBIR_FAULT_DELAY_AT="store_batch:2"))

    try:
        deadline = time.monotonic() + 180
        while len(finished) < len(payloads):
            assert time.monotonic() < deadline, (finished, server.tail())
            client_round()
            time.sleep(0.3)
        assert killed_mid_job >= 1, f"only {killed_mid_job} of {kills} kills hit a running job"
        ids = ids_by_sha(data_dir)
        from app.data.storage import sha256_hex

        images = {ids[sha256_hex(data)]: data for data in by_name.values()}
        assert len(images) == 300
        assert_consistent(server, images)  # rows == vectors == ntotal == 300, each finds itself
        for name, image_id in acknowledged.items():  # nothing acknowledged before a kill was lost
            assert ids[sha256_hex(by_name[name])] == image_id, name
        server.stop()
        checkpoint = VectorIndex.load(index_file(data_dir))
        assert checkpoint.ntotal == 300 and checkpoint.high_water_mark == db_rows(data_dir)["max_id"]
        assert not temp_files(data_dir)
    except AssertionError:
        kept = Path(__file__).resolve().parents[2] / "artifacts" / "r43-data"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(data_dir, kept)  # as crasher's --backup-working-dir: for the post-mortem
        raise
    print(f"r43: {kills} kill -9, {killed_mid_job} of them mid-job; 300 rows, 300 vectors, exact")


# -- 52: recall before and after a restart ---------------------------------------------------------
def exact_agreement(ctx: object, name: str, *, queries: np.ndarray) -> tuple[float, str]:
    """(recall@10 of the served index against brute force over the database's vectors, its kind)."""
    with ctx.db.session() as session:  # type: ignore[attr-defined]
        record = require_collection(session, name)
    vectors, ids = load_vectors(ctx.db, collection_id=record.id, embedder_version=record.embedder_version)  # type: ignore[attr-defined]
    index = ctx.indexes.serving(record)  # type: ignore[attr-defined]
    assert index is not None and index.ntotal == len(ids)
    truth = ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]]
    _, found = index.search(queries, 10)
    if index.kind == "Flat":
        assert np.array_equal(np.sort(found, axis=1), np.sort(truth, axis=1))  # exact: the same ten
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist(), strict=True))
    return hits / truth.size, index.kind


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["Flat", "HNSW32"])
def test_r52_recall_at_10_is_the_same_before_and_after_restart_and_recovery(
    kind: str, settings: Settings, tmp_path: Path
) -> None:
    from app.catalog.index_admin import configure_index

    rng = np.random.default_rng(52)
    queries = rng.standard_normal((200, EMBEDDER_DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    blobs = [png(seed, size=8) for seed in range(52_000, 53_200)]

    def add(ctx: object, chunk: list[bytes]) -> None:
        results = ingest_batch(ctx, collection="r", items=[Item(None, b) for b in chunk])  # type: ignore[arg-type]
        assert all(r.status == "added" for r in results)

    ctx = open_context(settings)
    try:
        create_collection(ctx, name="r", embedder="tiny")
        for start_ in range(0, 1000, 250):
            add(ctx, blobs[start_ : start_ + 250])
        if kind != "Flat":
            configure_index(ctx, name="r", factory=kind, params={})
            with ctx.db.session() as session:
                assert ctx.indexes.wait_for_build(require_collection(session, "r").id, timeout=120)
        before, served = exact_agreement(ctx, "r", queries=queries)
    finally:
        ctx.close()
    assert served == kind and before >= (1.0 if kind == "Flat" else 0.95)

    ctx = open_context(settings)  # a clean restart: the checkpoint is loaded
    try:
        after, served = exact_agreement(ctx, "r", queries=queries)
        assert served == kind and after == before
        old = tmp_path / "old.cbidx"
        shutil.copyfile(index_file(settings.data_dir), old)
        add(ctx, blobs[1000:])
    finally:
        ctx.close()
    shutil.copyfile(old, index_file(settings.data_dir))  # as if the last checkpoint was lost in a crash

    ctx = open_context(settings)  # recovery: the 200 missing vectors are replayed from the database
    try:
        recovered, served = exact_agreement(ctx, "r", queries=queries)
    finally:
        ctx.close()
    assert served == kind and recovered >= (1.0 if kind == "Flat" else 0.95)
    print(
        f"r52 {kind}: recall@10 {before:.3f} before, {after:.3f} after a restart, "
        f"{recovered:.3f} after recovery"
    )
