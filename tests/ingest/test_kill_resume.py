"""Issue 4's acceptance test: kill -9 the server at random moments during an import, five times;
after each restart the job resumes, and the end state is exact."""

from __future__ import annotations

import io
import json
import random
import sqlite3
import tarfile
import time
from pathlib import Path

import pytest

from app.ingest.sources.datasets import load_mnist, png_bytes
from tests.liveserver import DATASETS_DIR, LiveServer

pytestmark = pytest.mark.slow

IMAGES = 6000
KILLS = 5


def _archive(path: Path) -> dict[str, int]:
    """MNIST test digits as PNGs, plus two repeated files and three bad ones."""
    images, _ = load_mnist("test", datasets_dir=DATASETS_DIR, download_dir=path.parent)
    members: list[tuple[str, bytes]] = []
    for i in range(IMAGES):
        members.append((f"digits/{i % 10}/{i:05d}.png", png_bytes(images[i])))
        if i == 100:
            members.append(("bad/not-an-image.png", b"this is text, not a picture"))
        if i == 2500:
            members.append(("bad/truncated.png", members[0][1][:60]))
            members.append(("copies/again-0.png", members[0][1]))
        if i == 5000:
            members.append(("bad/empty.png", b""))
            members.append(("copies/again-1.png", members[1][1]))
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return {"total": len(members), "added": IMAGES, "duplicates": 2, "failed": 3}


def _job(server: LiveServer, job_id: str) -> dict:
    response = server.api("GET", f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_import_survives_five_kill_9_and_ends_exact(tmp_path: Path) -> None:
    expected = _archive(tmp_path / "digits.tar")
    data_dir = tmp_path / "data"
    server = LiveServer(data_dir, tmp_path / "server.log", env={"CBIR_IMPORT_BATCH_SIZE": "128"}).start()
    rng = random.Random(4)
    try:
        assert server.api("POST", "/collections", json={"name": "k", "embedder": "tiny"}).status_code == 201
        with open(tmp_path / "digits.tar", "rb") as handle:
            response = server.api(
                "POST", "/collections/k/imports", files={"file": ("digits.tar", handle, "application/x-tar")}
            )
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]

        killed_mid_import = 0
        for _ in range(KILLS):
            # Let the job make some progress since the last start, then kill at a random moment.
            before = _job(server, job_id)["done"]
            deadline = time.monotonic() + 60
            while _job(server, job_id)["done"] == before and _job(server, job_id)["state"] != "succeeded":
                assert time.monotonic() < deadline, server.tail()
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
            state = _job(server, job_id)
            server.kill()
            killed_mid_import += state["state"] == "running" and state["done"] < expected["total"]
            server.start()
        assert killed_mid_import >= 3, "the import finished before most kills: make it longer"

        deadline = time.monotonic() + 300
        while (job := _job(server, job_id))["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        assert {k: job[k] for k in expected} == {**expected, "total": expected["total"]}
        assert job["done"] == expected["total"]

        collection = server.api("GET", "/collections/k").json()
        assert collection["image_count"] == collection["index_size"] == IMAGES

        report = server.api("GET", f"/jobs/{job_id}/report").text.splitlines()
        lines = [json.loads(line) for line in report]
        assert len(lines) == expected["total"]
        assert len({line["item"] for line in lines}) == expected["total"]  # each member exactly once
        statuses = [line["status"] for line in lines]
        assert statuses.count("added") == IMAGES and statuses.count("rejected") == 3
    finally:
        server.stop()

    files = [p for p in (data_dir / "images").rglob("*") if p.is_file()]
    assert len(files) == IMAGES, "an orphan or missing image file"
    with sqlite3.connect(data_dir / "cbir.sqlite3") as db:
        (rows,) = db.execute("select count(*) from images").fetchone()
        (distinct,) = db.execute("select count(distinct sha256) from images").fetchone()
        (vectors,) = db.execute("select count(*) from embeddings").fetchone()
    assert rows == distinct == vectors == IMAGES
    assert not list((data_dir / "uploads").iterdir()), "the upload outlived its job"
    journals = list((data_dir / "journal").glob("*.journal"))
    assert all(p.stat().st_size == 0 for p in journals) and len(journals) <= 1
