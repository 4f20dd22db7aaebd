"""Reliability plan, section G: a full disk, a read-only disk and database faults (55-59).

The disk faults go through the storage seam (``app.data.storage.write_atomic``, the function every image
file is written with) on the in-process app, except 56, where the kernel itself refuses the write:
a live server runs under RLIMIT_FSIZE. PostgreSQL faults (59) run on the PostgreSQL pass of
``make test`` and are skipped on SQLite.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

import app.data.storage
from app.core.settings import Settings
from app.data.records import EmbeddingRecord, ImageRecord
from app.main import create_app
from index import VectorIndex
from tests.api.helpers import assert_problem
from tests.api.test_imports import make_zip, start_archive_import, wait_for_job
from tests.conftest import ON_POSTGRES
from tests.data.test_postgres import race_uploads_and_imports
from tests.liveserver import ROOT, LiveServer, server_env

API = "/api/v1"
REAL_WRITE = app.data.storage.write_atomic
# Live servers run on SQLite in both passes of `make test`: their tests run once, in the SQLite pass.
sqlite_pass_only = pytest.mark.skipif(ON_POSTGRES, reason="a live server on SQLite: runs in the SQLite pass")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Small import batches: a bulk job commits several batches before a fault can stop it.
    return settings.model_copy(update={"import_batch_size": 4})


def upload(client: TestClient, data: bytes, name: str = "a.png") -> httpx.Response:
    return client.post(f"{API}/collections/shapes/images", files={"file": (name, data, "image/png")})


def counts(client: TestClient) -> tuple[int, int]:
    """(image rows, embedding rows) in the app's database."""
    with client.app.state.context.db.session() as session:  # type: ignore[attr-defined]
        return (
            session.scalar(select(func.count()).select_from(ImageRecord)) or 0,
            session.scalar(select(func.count()).select_from(EmbeddingRecord)) or 0,
        )


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


class DiskFault:
    """The storage seam failing like a disk that fills up mid-file: after ``after`` good files,
    each write leaves half a temporary file behind (as a killed or refused write does) and raises
    ``OSError(code)``. ``clear()`` lets writes through again."""

    def __init__(self, code: int, *, after: int = 0) -> None:
        self.code = code
        self.after = after
        self.active = True
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, path: Path, data: bytes, **kwargs: Any) -> None:
        with self._lock:
            self.calls += 1
            fail = self.active and self.calls > self.after
        if not fail:
            REAL_WRITE(path, data, **kwargs)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".{path.name}.half.tmp").write_bytes(data[: len(data) // 2])
        raise OSError(self.code, os.strerror(self.code), str(path))

    def clear(self) -> None:
        self.active = False


@contextmanager
def disk_fault(monkeypatch: pytest.MonkeyPatch, code: int, *, after: int = 0) -> Iterator[DiskFault]:
    fault = DiskFault(code, after=after)
    monkeypatch.setattr(app.data.storage, "write_atomic", fault)
    yield fault
    fault.clear()


# -- 55: no space while saving an image file -------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG], ids=["ENOSPC", "EDQUOT", "EFBIG"])
def test_r55_full_disk_on_upload_is_a_507_that_keeps_nothing_and_the_retry_succeeds(
    client: TestClient,
    collection: str,
    make_png: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    code: int,
):
    data = make_png(1)
    with disk_fault(monkeypatch, code) as fault:
        response = upload(client, data)
        assert fault.calls == 1, "the upload never reached the storage seam"
        assert_problem(response, 507, "insufficient_storage")
        assert "Traceback" not in response.text and "Errno" not in response.text
        # Rolled back: no row, no vector, no file (not even the half-written one), nothing indexed.
        assert counts(client) == (0, 0)
        assert files_under(settings.images_dir) == []
        info = client.get(f"{API}/collections/{collection}").json()
        assert (info["image_count"], info["index_size"]) == (0, 0)
        assert client.get(f"{API}/health").status_code == 200
        fault.clear()
        retry = upload(client, data)
    assert retry.status_code == 201, retry.text
    assert counts(client) == (1, 1)
    sha = hashlib.sha256(data).hexdigest()
    assert [p.name for p in files_under(settings.images_dir)] == [f"{sha}.png"]
    info = client.get(f"{API}/collections/{collection}").json()
    assert (info["image_count"], info["index_size"]) == (1, 1)


@pytest.mark.timeout(120)
def test_r55_full_disk_stops_a_bulk_import_with_its_reason_and_keeps_committed_batches(
    client: TestClient,
    collection: str,
    make_png: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
):
    monkeypatch.setattr("app.ingest.pipeline.CHUNK_ITEMS", 4)  # batches of 4, with the setting
    archive = make_zip({f"digits/{seed:02d}.png": make_png(seed) for seed in range(12)})
    # Batches of 4 (settings above): the 6th file write fails, in the second batch.
    with disk_fault(monkeypatch, errno.ENOSPC, after=5):
        job = wait_for_job(client, start_archive_import(client, collection, archive).json()["job_id"])
    assert job["state"] == "failed", job
    assert job["error"].startswith("insufficient_storage:"), job["error"]
    assert job["added"] == 4 and job["done"] == 4, job  # the first batch committed, nothing after
    # What the first batch acknowledged is all there: rows, vectors, files, index; nothing else.
    assert counts(client) == (4, 4)
    with client.app.state.context.db.session() as session:  # type: ignore[attr-defined]
        shas = set(session.scalars(select(ImageRecord.sha256)))
    assert {p.name.split(".")[0] for p in files_under(settings.images_dir)} == shas
    info = client.get(f"{API}/collections/{collection}").json()
    assert (info["image_count"], info["index_size"]) == (4, 4)
    report = client.get(f"{API}/jobs/{job['id']}/report")
    assert report.status_code == 200 and len(report.text.splitlines()) == 4

    # Space again: importing the same archive stores the rest and recognises the first batch.
    again = wait_for_job(client, start_archive_import(client, collection, archive).json()["job_id"])
    assert again["state"] == "succeeded", again
    assert (again["added"], again["duplicates"]) == (8, 4), again
    assert counts(client) == (12, 12)


# -- 56: real EFBIG from the kernel while checkpointing the index ----------------------------
def _digits_tar(path: Path, *, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    from app.ingest.sources.datasets import png_bytes

    with tarfile.open(path, "w") as archive:
        for i in range(count):
            data = png_bytes(rng.integers(0, 256, size=(28, 28), dtype=np.uint8))
            info = tarfile.TarInfo(f"d/{i:05d}.png")
            info.size = len(data)
            import io

            archive.addfile(info, io.BytesIO(data))


def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death; survives exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def _wait(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@sqlite_pass_only
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(600)
def test_r56_checkpoint_over_rlimit_fsize_fails_keeps_the_old_file_and_catches_up_after_restart(
    tmp_path: Path, make_png: Callable[..., bytes]
):
    # RLIMIT_FSIZE limits every file the server writes, SQLite's database and WAL included
    # (writes past the limit's offset fail, whatever the file's size: pre-sizing cannot help).
    # So the index must be the largest file: HNSW256 keeps 2 KB of graph links per 64-d vector
    # (about 2.3 KB a vector in all, against about 0.7 KB of database), and the limit sits just
    # above its checkpoint, far above the database and the WAL of the few uploads below.
    data_dir = tmp_path / "data"
    archive = tmp_path / "seed.tar"
    _digits_tar(archive, count=1500, seed=56)
    log = tmp_path / "server.log"
    server = LiveServer(data_dir, log).start()
    try:
        assert server.api("POST", "/collections", json={"name": "big", "embedder": "tiny"}).status_code == 201
        assert server.api("PUT", "/collections/big/index", json={"factory": "HNSW256"}).status_code in (
            200,
            202,
        )
        with archive.open("rb") as handle:
            response = server.api("POST", "/collections/big/imports", files={"file": ("seed.tar", handle)})
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        _wait(
            lambda: server.api("GET", f"/jobs/{job_id}").json()["state"] in ("succeeded", "failed"),
            timeout=300,
            what="the seed import",
        )
        assert server.api("GET", f"/jobs/{job_id}").json()["state"] == "succeeded", server.tail()
        assert server.api("GET", "/collections/big/index").json()["kind"].startswith("HNSW256")
    finally:
        server.stop()  # flushes: the index file now holds all 1500

    index_file = next((data_dir / "indexes").glob("collection-*.cbidx"))
    before = index_file.read_bytes()
    saved = VectorIndex.load(index_file)
    assert saved.ntotal == 1500
    limit = len(before) + 8 * 1024  # room for 3 more vectors, not for 30
    database = data_dir / "cbir.sqlite3"
    print(f"index file {len(before)} B, database {database.stat().st_size} B, limit {limit} B")
    assert database.stat().st_size < limit // 2, "the database must stay below the limit"
    assert not Path(f"{database}-wal").exists() or Path(f"{database}-wal").stat().st_size < limit // 2

    limited = LiveServer(data_dir, log, preexec_fn=_limit_file_size(limit)).start()
    ids: list[int] = []
    try:
        for seed in range(30):
            response = limited.api(
                "POST", "/collections/big/images", files={"file": (f"n{seed}.png", make_png(10_000 + seed))}
            )
            assert response.status_code == 201, response.text  # the database is the truth
            ids.append(response.json()["id"])
        _wait(
            lambda: "checkpoint_failed" in limited.api("GET", "/health").json()["degraded"],
            timeout=60,
            what="health to report checkpoint_failed",
        )
        health = limited.api("GET", "/health").json()
        assert health["status"] == "degraded"
        assert health["collections"][0]["images"] == 1530
        assert health["collections"][0]["indexed"] == 1530  # served from memory all along
        # Searches still find the new images.
        hits = limited.api(
            "POST", "/collections/big/search?k=1", files={"file": ("q.png", make_png(10_029))}
        ).json()["hits"]
        assert hits[0]["id"] == ids[-1]
        # The last checkpoint on disk is whole and was not advanced past what it could hold.
        on_disk = VectorIndex.load(index_file)
        assert 1500 <= on_disk.ntotal < 1530
        assert on_disk.high_water_mark < ids[-1]
        assert not list(index_file.parent.glob(".*.tmp")), "a refused checkpoint left its temporary file"
    finally:
        limited.stop()
    assert "index checkpoint of collection" in log.read_text() and "File too large" in log.read_text()

    # Restarted without the limit: the index is caught up from the database and checkpointed.
    server = LiveServer(data_dir, log).start()
    try:
        info = server.api("GET", "/collections/big").json()
        assert (info["image_count"], info["index_size"]) == (1530, 1530)
        assert server.api("GET", "/health").json()["degraded"] == []
        _wait(
            lambda: VectorIndex.load(index_file).ntotal == 1530,
            timeout=60,
            what="a checkpoint holding every image",
        )
    finally:
        server.stop()


# -- 57: read-only storage ---------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files_under(folder)}


@pytest.mark.timeout(120)
def test_r57_read_only_setting_refuses_writes_with_503_and_keeps_search_pages_and_health(
    settings: Settings, make_png: Callable[..., bytes], tmp_path: Path
):
    if ON_POSTGRES:
        pytest.skip("the SQLite mode=ro half; PostgreSQL read-only transactions are checked in 59")
    with TestClient(create_app(settings), raise_server_exceptions=False) as writer:
        assert (
            writer.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
        )
        ids = [
            upload(writer, make_png(seed, size=(300, 300)), f"{seed}.png").json()["id"] for seed in range(3)
        ]
    before = _snapshot(settings.data_dir)

    read_only = settings.model_copy(update={"read_only": True})
    with TestClient(create_app(read_only), raise_server_exceptions=False) as client:
        engine = client.app.state.context.db.engine  # type: ignore[attr-defined]
        assert "mode=ro" in str(engine.url)
        with engine.connect() as connection, pytest.raises(Exception, match="readonly"):
            connection.execute(text("DELETE FROM images"))

        writes = [
            upload(client, make_png(9)),
            client.delete(f"{API}/images/{ids[0]}"),
            client.post(f"{API}/collections", json={"name": "more", "embedder": "tiny"}),
            start_archive_import(client, "shapes", make_zip({"a/1.png": make_png(11)})),
            client.delete(f"{API}/collections/shapes"),
        ]
        for response in writes:
            assert_problem(response, 503, "read_only")
            assert int(response.headers["retry-after"]) > 0

        found = client.post(
            f"{API}/collections/shapes/search?k=3", files={"file": ("q.png", make_png(1, size=(300, 300)))}
        )
        assert found.status_code == 200, found.text
        assert found.json()["hits"][0]["id"] == ids[1]
        for page in ("/", "/browse?collection=shapes"):
            assert client.get(page).status_code == 200
        thumb = client.get(f"{API}/images/{ids[1]}/thumbnail?size=64")
        assert thumb.status_code == 200
        health = client.get(f"{API}/health")
        assert health.status_code == 200
        assert health.json()["degraded"] == ["read_only"]
        assert health.json()["collections"][0]["images"] == 3

    after = _snapshot(settings.data_dir)
    # SQLite may create its -wal / -shm beside the file to read it; nothing else is written.
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {"cbir.sqlite3-wal", "cbir.sqlite3-shm"}, changed


@pytest.mark.timeout(60)
def test_r57_erofs_from_the_storage_seam_turns_writes_off_until_the_retry_window_passes(
    client: TestClient, collection: str, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
):
    stored = upload(client, make_png(1)).json()["id"]
    with disk_fault(monkeypatch, errno.EROFS) as fault:
        first = upload(client, make_png(2))
        assert_problem(first, 503, "read_only")
        assert int(first.headers["retry-after"]) > 0
        assert counts(client) == (1, 1)
        fault.clear()
        # The gate stays closed for its window: writes are refused at once, without retrying disk.
        second = upload(client, make_png(3))
        assert_problem(second, 503, "read_only")
        assert fault.calls == 1
        assert client.delete(f"{API}/images/{stored}").status_code == 503
        found = client.post(
            f"{API}/collections/{collection}/search?k=1", files={"file": ("q.png", make_png(1))}
        )
        assert found.status_code == 200 and found.json()["hits"][0]["id"] == stored
        assert client.get(f"{API}/health").json()["degraded"] == ["read_only"]
        assert client.get("/").status_code == 200

    client.app.state.context.store.gate.retry_after = 0  # type: ignore[attr-defined]  # the window passes
    assert upload(client, make_png(3)).status_code == 201
    assert client.get(f"{API}/health").json()["degraded"] == []
    assert counts(client) == (2, 2)


def _refusal(status: int) -> Exception:
    """The DBAPI error the database raises when its disk is full (507) or it is read-only (503)."""
    if ON_POSTGRES:
        import psycopg.errors

        if status == 507:
            return psycopg.errors.DiskFull("could not extend file: No space left on device")
        return psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")
    error = sqlite3.OperationalError(
        "database or disk is full" if status == 507 else "attempt to write a readonly database"
    )
    error.sqlite_errorcode = 13 if status == 507 else 8  # type: ignore[attr-defined]  # SQLITE_FULL, _READONLY
    return error


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("status", "code"), [(507, "insufficient_storage"), (503, "read_only")])
def test_r57_database_refusing_writes_for_space_or_read_only_is_answered_by_its_code(
    client: TestClient,
    collection: str,
    make_png: Callable[..., bytes],
    settings: Settings,
    status: int,
    code: str,
):
    from sqlalchemy import event

    engine = client.app.state.context.db.engine  # type: ignore[attr-defined]
    error = _refusal(status)

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO IMAGES"):
            raise error

    event.listen(engine, "before_cursor_execute", hook)
    try:
        response = upload(client, make_png(4))
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    assert_problem(response, status, code)
    assert counts(client) == (0, 0)
    assert files_under(settings.images_dir) == []  # the file written before the insert went too


# -- 58: "database is locked" ------------------------------------------------------------------
def test_r58_sqlite_engine_waits_for_locks_and_runs_in_wal(ctx: Any):
    if ON_POSTGRES:
        pytest.skip("SQLite pragmas")
    with ctx.db.engine.connect() as connection:
        assert connection.scalar(text("PRAGMA busy_timeout")) >= 5000
        assert connection.scalar(text("PRAGMA journal_mode")) == "wal"


@sqlite_pass_only
@pytest.mark.fault
@pytest.mark.timeout(300)
def test_r58_two_bulk_jobs_in_two_processes_and_eight_uploads_on_sqlite_never_500(
    tmp_path: Path, make_png: Callable[..., bytes]
):
    # SQLite's lock is per database file: inside one process the write lock serialises writers,
    # so the contention that ends in "database is locked" comes from a second process. One bulk
    # job runs in the server, the other in `cbir import` beside it, with 8 uploads at the same time.
    data_dir = tmp_path / "data"
    server = LiveServer(data_dir, tmp_path / "server.log").start()
    try:
        created = server.api("POST", "/collections", json={"name": "shapes", "embedder": "tiny"})
        assert created.status_code == 201, created.text
        served = make_zip({f"a/{seed}.png": make_png(seed) for seed in range(0, 80)})
        beside = tmp_path / "beside.zip"
        beside.write_bytes(make_zip({f"b/{seed}.png": make_png(seed) for seed in range(40, 120)}))
        upload_seeds = [500 + i % 4 for i in range(8)]  # each image twice, at the same moment
        start = threading.Barrier(2 + len(upload_seeds))

        def send_import() -> httpx.Response:
            start.wait()
            return server.api("POST", "/collections/shapes/imports", files={"file": ("a.zip", served)})

        def run_cli() -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "app.cli", "import", str(beside), "--collection", "shapes"]
            env = server_env(data_dir, CBIR_IMPORT_PROCESSES="0")
            start.wait()
            return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)

        def send_upload(seed: int) -> httpx.Response:
            start.wait()
            return server.api(
                "POST", "/collections/shapes/images", files={"file": (f"{seed}.png", make_png(seed))}
            )

        with ThreadPoolExecutor(max_workers=start.parties) as pool:
            cli = pool.submit(run_cli)
            job = pool.submit(send_import)
            uploads = [pool.submit(send_upload, seed) for seed in upload_seeds]
            responses = [job.result(timeout=120)] + [f.result(timeout=120) for f in uploads]
            beside_done = cli.result(timeout=250)
        for response in responses:
            assert response.status_code < 500, response.text
            assert response.status_code != 503 or "retry-after" in response.headers
        assert responses[0].status_code == 202, responses[0].text
        assert [r.status_code for r in responses[1:]].count(201) == 4  # one of each pair created it
        assert all(r.status_code in (200, 201) for r in responses[1:]), [r.text for r in responses[1:]]
        assert beside_done.returncode == 0, beside_done.stderr[-3000:]
        assert "locked" not in beside_done.stderr
        job_id = responses[0].json()["job_id"]
        _wait(
            lambda: server.api("GET", f"/jobs/{job_id}").json()["state"] in ("succeeded", "failed"),
            timeout=180,
            what="the server's import",
        )
        assert server.api("GET", f"/jobs/{job_id}").json()["state"] == "succeeded"
        assert server.api("GET", "/collections/shapes").json()["image_count"] == 120 + 4
        assert "Traceback" not in server.tail(100_000)
    finally:
        server.stop()
    with sqlite3.connect(data_dir / "cbir.sqlite3") as db:
        assert db.execute("SELECT count(*), count(DISTINCT sha256) FROM images").fetchone() == (124, 124)
        assert db.execute("SELECT count(*) FROM embeddings").fetchone() == (124,)


# -- 59: PostgreSQL ----------------------------------------------------------------------------
@pytest.mark.pg
@pytest.mark.timeout(120)
def test_r59_postgres_connection_killed_mid_transaction_is_a_503_writes_nothing_and_pool_recovers(
    client: TestClient, collection: str, make_png: Callable[..., bytes], pg_admin: Any
):
    from tests.data.test_postgres import _kill_own_connection, app_engine, before_first, image_rows

    data = make_png(3)
    engine = app_engine(client)
    # Killed between the image row and its vector: the whole transaction must go.
    with before_first(engine, "INSERT INTO EMBEDDINGS", _kill_own_connection(pg_admin)) as fired:
        response = upload(client, data)
    assert fired
    assert_problem(response, 503, "database_unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert image_rows(engine) == {}
    assert counts(client) == (0, 0)
    assert files_under(client.app.state.context.settings.images_dir) == []  # type: ignore[attr-defined]
    # The pool hands out live connections again: reads, writes, health.
    retry = upload(client, data)
    assert retry.status_code == 201, retry.text
    assert client.get(f"{API}/images/{retry.json()['id']}").status_code == 200
    assert client.get(f"{API}/health").status_code == 200
    info = client.get(f"{API}/collections/{collection}").json()
    assert info["image_count"] == info["index_size"] == 1


@pytest.mark.pg
@pytest.mark.timeout(120)
def test_r59_postgres_concurrent_reuploads_store_once_and_contention_never_500s(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
):
    archives = [
        make_zip({f"{tag}/{seed}.png": make_png(seed) for seed in range(lo, lo + 12)})
        for tag, lo in (("a", 0), ("b", 6))
    ]
    seeds = [100, 101] * 4  # the same two images, four times each, at once
    upload_responses, import_responses = race_uploads_and_imports(
        client, collection, [make_png(seed) for seed in seeds], archives, timeout=60
    )
    assert all(r.status_code in (200, 201) for r in upload_responses), [r.text for r in upload_responses]
    by_seed: dict[int, set[int]] = {}
    for seed, response in zip(seeds, upload_responses, strict=True):
        by_seed.setdefault(seed, set()).add(response.json()["id"])
    assert all(len(found) == 1 for found in by_seed.values()), by_seed  # idempotent: one id each
    assert sum(r.json()["created"] for r in upload_responses) == 2
    jobs = [wait_for_job(client, r.json()["job_id"]) for r in import_responses]
    assert all(job["state"] == "succeeded" for job in jobs), jobs
    assert counts(client) == (18 + 2, 18 + 2)


@pytest.mark.pg
def test_r59_postgres_has_fsync_on_here_and_in_the_compose_file(pg_admin: Any, client: TestClient):
    with pg_admin.connect() as connection:
        assert connection.scalar(text("SHOW fsync")) == "on"
        assert connection.scalar(text("SHOW synchronous_commit")) == "on"
    # CBIR_READ_ONLY on PostgreSQL: every transaction of the app is read-only.
    settings = client.app.state.context.settings.model_copy(update={"read_only": True})  # type: ignore[attr-defined]
    from app.data.db import Database, storage_fault

    database = Database(settings.sqlalchemy_url, read_only=True)
    try:
        with database.engine.connect() as connection, pytest.raises(Exception) as raised:
            connection.execute(text("CREATE TABLE nope (x int)"))
        assert storage_fault(raised.value).code == "read_only"  # type: ignore[union-attr]
    finally:
        database.dispose()


def test_r59_compose_postgres_keeps_fsync_and_synchronous_commit_on():
    """What the deployment runs: nothing in docker-compose.yml turns durability off (PostgreSQL's
    defaults, fsync=on and synchronous_commit=on, stand)."""
    compose = (ROOT / "docker-compose.yml").read_text()
    lowered = compose.replace(" ", "").lower()
    for setting in ("fsync=off", "fsync=false", "synchronous_commit=off", "full_page_writes=off"):
        assert setting not in lowered, f"docker-compose.yml sets {setting}"
    assert "image: postgres:" in compose
