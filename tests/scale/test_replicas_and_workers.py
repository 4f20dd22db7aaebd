"""Many processes on one PostgreSQL database, one Milvus and one data folder (docs/scaling.md).

Real processes on 127.0.0.1: a ``milvus-lite server`` (the session's), two ``cbir serve --role
api`` replicas (A, B) and two ``cbir worker`` processes. An upload to A is B's top-1 at once; an
import queued on A is claimed by a worker, its progress read on B; the worker holding it is killed
with SIGKILL mid-import and the other worker takes it over when its lease runs out and finishes it
with exactly one row, one file and one Milvus vector per image, each image its own top-1; a
collection deleted on B is gone on A; B keeps answering when A is killed.

PostgreSQL pass only (SQLite keeps the jobs in the process that queued them).
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, func, select

from app.data.records import CollectionRecord, EmbeddingRecord, ImageRecord, JobRecord
from tests.liveserver import ROOT, LiveServer, server_env

IMPORTED = 2000
BATCH = 100
LEASE_S = 4


def png(seed: int, size: int = 16) -> bytes:
    """A distinct noise image: its 8x8 ``tiny`` code differs from every other seed's."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def archive(seeds: range) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as handle:
        for seed in seeds:
            handle.writestr(f"img/{seed:05d}.png", png(seed))
    return out.getvalue()


def within(seconds: float, check: Callable[[], Any], *, what: str) -> Any:
    """Poll ``check`` until it returns a true value; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


class Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.heartbeat = log.with_suffix(".alive")
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", "--heartbeat", str(self.heartbeat)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 120) -> None:
        within(
            timeout, lambda: self.heartbeat.exists() or self.process.poll() is not None, what="worker start"
        )
        assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def cluster(
    tmp_path: Path, database_url: str, milvus_uri: str
) -> Iterator[tuple[LiveServer, LiveServer, list[Worker], dict[str, str]]]:
    if not database_url:
        pytest.skip("several processes share their jobs through PostgreSQL: runs in the PostgreSQL pass")
    data = tmp_path / "data"
    common = {
        "CBIR_DATABASE_URL": database_url,
        "CBIR_VECTOR_STORE": milvus_uri.replace("http://", "milvus://"),
        "CBIR_VECTOR_STORE_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "CBIR_JOB_LEASE_SECONDS": str(LEASE_S),
        "CBIR_JOB_POLL_SECONDS": "0.25",
        "CBIR_IMPORT_BATCH_SIZE": str(BATCH),
        "CBIR_IMPORT_PROCESSES": "false",
    }
    replicas = [
        LiveServer(data_dir=data, log=tmp_path / f"api-{name}.log", env={**common, "CBIR_ROLE": "api"})
        for name in "ab"
    ]
    # Each batch of the workers takes a little longer, so that the import is still running when
    # its worker is killed.
    worker_env = server_env(data, **common, CBIR_FAULT_DELAY_AT="store_batch:0.3")
    workers: list[Worker] = []
    try:
        replicas[0].start()  # migrates the database; the others find it at head
        replicas[1].start()
        workers = [Worker(worker_env, tmp_path / f"worker-{i}.log") for i in range(2)]
        for worker in workers:
            worker.wait_ready()
        yield replicas[0], replicas[1], workers, common
    finally:
        for worker in workers:
            worker.stop()
        for replica in replicas:
            replica.stop()


def search(server: LiveServer, collection: str, image: bytes, k: int = 1) -> httpx.Response:
    return server.api(
        "POST",
        f"/collections/{collection}/search",
        params={"k": k},
        files={"file": ("q.png", image, "image/png")},
    )


def test_replicas_and_workers_share_one_database_and_one_milvus(
    cluster: tuple[LiveServer, LiveServer, list[Worker], dict[str, str]], database_url: str, milvus_uri: str
) -> None:
    a, b, workers, common = cluster
    for name in ("one", "bulk"):
        created = a.api("POST", "/collections", json={"name": name, "embedder": "tiny"})
        assert created.status_code == 201, created.text

    # -- an upload to A is B's own top-1 within 2 s ------------------------------------------------
    image = png(10**6)
    uploaded = a.api("POST", "/collections/one/images", files={"file": ("x.png", image, "image/png")})
    assert uploaded.status_code == 201, uploaded.text
    image_id = uploaded.json()["id"]

    def b_finds_it() -> bool:
        response = search(b, "one", image)
        return response.status_code == 200 and [r["id"] for r in response.json()["hits"]][:1] == [image_id]

    within(2.0, b_finds_it, what="replica B finds A's upload as its top-1")

    # -- an import queued on A: a worker claims it, B shows its progress -----------------------------
    started = a.api(
        "POST",
        "/collections/bulk/imports",
        files={"file": ("bulk.zip", archive(range(IMPORTED)), "application/zip")},
    )
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    engine = create_engine(database_url)
    try:

        def holder() -> tuple[str, int] | None:
            with engine.connect() as connection:
                row = connection.execute(
                    select(JobRecord.owner, JobRecord.done).where(JobRecord.id == job_id)
                ).first()
            return (row[0], row[1]) if row and row[0] and row[1] >= 3 * BATCH else None

        owner, _ = within(90, holder, what="a worker has committed a few batches of the import")
        progress = b.api("GET", f"/jobs/{job_id}").json()
        assert progress["state"] == "running" and 0 < progress["done"] < IMPORTED, progress
        pids = {w.process.pid: w for w in workers}
        victim = pids[int(owner.split("-", 1)[0])]  # the owner is the journal "PID-xxxx.journal"
        victim.process.kill()  # SIGKILL, mid-import
        victim.process.wait(timeout=30)
        survivor = next(w for w in workers if w is not victim)

        def finished() -> dict[str, Any] | None:
            job = b.api("GET", f"/jobs/{job_id}").json()
            return job if job["state"] not in ("queued", "running") else None

        job = within(120, finished, what="the other worker finishes the import")
        assert job["state"] == "succeeded", job
        assert (job["done"], job["added"], job["failed"]) == (IMPORTED, IMPORTED, 0), job
        assert job["resumes"] >= 1, job
        with engine.connect() as connection:
            final_owner = connection.scalar(select(JobRecord.owner).where(JobRecord.id == job_id))
            assert final_owner is not None and final_owner.startswith(f"{survivor.process.pid}-")
            bulk_id, version = connection.execute(
                select(CollectionRecord.id, CollectionRecord.embedder_version).where(
                    CollectionRecord.name == "bulk"
                )
            ).one()
            rows = connection.scalar(
                select(func.count()).select_from(ImageRecord).where(ImageRecord.collection_id == bulk_id)
            )
            all_rows = connection.scalar(select(func.count()).select_from(ImageRecord))
            ids, blobs = zip(
                *connection.execute(
                    select(EmbeddingRecord.image_id, EmbeddingRecord.vector)
                    .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
                    .where(ImageRecord.collection_id == bulk_id)
                    .where(EmbeddingRecord.embedder_version == version)
                    .order_by(EmbeddingRecord.image_id)
                ).all(),
                strict=True,
            )
    finally:
        engine.dispose()
    files = [p for p in (a.data_dir / "images").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert rows == len(ids) == IMPORTED
    assert len(files) == all_rows == IMPORTED + 1  # and the upload of "one"
    in_milvus(common, milvus_uri, collection_id=bulk_id, version=version, ids=ids, blobs=blobs)

    # -- a collection deleted on B answers 404 on A within 2 s ----------------------------------------
    assert b.api("DELETE", "/collections/one").status_code == 204
    within(2.0, lambda: search(a, "one", image).status_code == 404, what="A answers 404 for it")
    assert a.api("GET", "/collections/one").status_code == 404

    # -- A killed, B keeps answering --------------------------------------------------------------------
    a.kill()
    for seed in (0, IMPORTED // 2, IMPORTED - 1):
        response = search(b, "bulk", png(seed))
        assert response.status_code == 200, response.text
        assert response.json()["hits"][0]["original_name"].endswith(f"{seed:05d}.png"), response.json()


def in_milvus(
    common: dict[str, str], milvus_uri: str, *, collection_id: int, version: str, ids: Any, blobs: Any
) -> None:
    """Milvus holds exactly the database's vectors of the collection, each its own top-1."""
    from index.milvus_store import MilvusStore
    from index.store import space_name

    store = MilvusStore(milvus_uri)
    try:  # the served name (an alias of the space holding the vectors)
        space = space_name(
            collection_id=collection_id, embedder_version=version, prefix=common["CBIR_VECTOR_STORE_PREFIX"]
        )
        db_ids = np.asarray(ids, dtype=np.int64)
        assert np.array_equal(np.sort(store.list_ids(space)), db_ids)
        assert store.count(space) == len(db_ids)
        vectors = np.stack([np.frombuffer(blob, dtype="<f4") for blob in blobs])
        for start in range(0, len(db_ids), 500):
            _, found = store.search(space, vectors[start : start + 500], 1)
            assert np.array_equal(found[:, 0], db_ids[start : start + 500])
    finally:
        store.close()
