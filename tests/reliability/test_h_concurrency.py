"""Reliability plan, section H: searches running against writes (60-62).

60 hammers the index wrapper (``index.VectorIndex``: FAISS behind a readers-writer lock) from
threads in a child process, so that a segfault fails the test instead of killing pytest. 61 runs
searches against a live server while a bulk import indexes. 62 overloads the upload path.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.api.helpers import assert_problem
from tests.conftest import ON_POSTGRES
from tests.liveserver import ROOT, LiveServer

API = "/api/v1"
# No database in 60, a live server on SQLite in 61: they run once, in the SQLite pass of `make test`.
sqlite_pass_only = pytest.mark.skipif(ON_POSTGRES, reason="does not depend on the test database")


# -- 60: FAISS lock discipline -------------------------------------------------------------------
def hammer(*, factory: str, seconds: float, searchers: int = 4, dim: int = 32) -> dict[str, Any]:
    """``searchers`` threads search in a loop for ``seconds`` while one writer adds, removes and
    checkpoints. Every id a search returns must have been valid at some moment of that search
    (its add begun before the search ended, its removal, if any, not finished before it began),
    and its score must be the query's inner product with that id's own vector (a search racing a
    remove that shifts the stored rows would pair ids with other rows' scores)."""
    import faiss

    from index import VectorIndex
    from index.factories import normalise_factory

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(60)

    def unit(n: int) -> np.ndarray:
        v = rng.standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    index = VectorIndex(dim, factory=normalise_factory(factory))
    added_at: dict[int, float] = {}
    removed_at: dict[int, float] = {}
    stored: dict[int, np.ndarray] = {}
    start_ids = np.arange(2000, dtype=np.int64)
    first = unit(2000)
    for i, vector in zip(start_ids, first, strict=True):
        added_at[int(i)] = 0.0
        stored[int(i)] = vector
    index.add(first, start_ids)
    live = list(range(2000))
    next_id = 2000
    stop = threading.Event()
    problems: list[str] = []
    searches = [0] * searchers
    writer_ops: dict[str, list[float]] = {"add": [], "remove": [], "save": []}
    queries = unit(64)

    def search_loop(slot: int) -> None:
        local = np.random.default_rng(slot)
        try:
            while not stop.is_set():
                query = queries[local.integers(0, len(queries))][None, :]
                began = time.perf_counter()
                scores, ids = index.search(query, 10)
                ended = time.perf_counter()
                for found, score in zip(ids[0].tolist(), scores[0].tolist(), strict=True):
                    if found < 0:
                        continue
                    if found not in added_at or added_at[found] > ended:
                        problems.append(f"id {found} returned before it was added")
                    elif removed_at.get(found, float("inf")) < began:
                        problems.append(f"id {found} returned after its removal finished")
                    elif abs(float(stored[found] @ query[0]) - score) > 1e-4:
                        problems.append(f"id {found} returned with another vector's score")
                searches[slot] += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            problems.append(f"search raised {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=search_loop, args=(i,), daemon=True) for i in range(searchers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    checkpoint = Path(os.environ.get("TMPDIR", "/tmp")) / f"hammer-{os.getpid()}.cbidx"
    rounds = 0
    try:
        while time.monotonic() < deadline:
            new = np.arange(next_id, next_id + 50, dtype=np.int64)
            next_id += 50
            vectors = unit(50)
            for i, vector in zip(new.tolist(), vectors, strict=True):
                stored[i] = vector
            began = time.perf_counter()
            for i in new.tolist():
                added_at[i] = began
            index.add(vectors, new)
            writer_ops["add"].append(time.perf_counter() - began)
            live.extend(int(i) for i in new)

            gone = [live.pop(int(rng.integers(0, len(live)))) for _ in range(25)]
            began = time.perf_counter()
            index.remove(np.asarray(gone, dtype=np.int64))
            done = time.perf_counter()
            writer_ops["remove"].append(done - began)
            for i in gone:
                removed_at[i] = done
            rounds += 1
            if rounds % 10 == 0:
                began = time.perf_counter()
                index.save(checkpoint)
                writer_ops["save"].append(time.perf_counter() - began)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"writer raised {type(exc).__name__}: {exc}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        checkpoint.unlink(missing_ok=True)
    return {
        "problems": problems[:20],
        "searches": searches,
        "rounds": rounds,
        "max_op_s": {op: max(times, default=0.0) for op, times in writer_ops.items()},
        "saves": len(writer_ops["save"]),
        "ntotal": index.ntotal,
        "live": len(live),
    }


@sqlite_pass_only
@pytest.mark.timeout(120)
@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_r60_index_searches_during_adds_removes_and_checkpoints_stay_correct_in_a_child_process(
    factory: str, tmp_path: Path
):
    # Only the function travels: the child imports numpy, FAISS and the index package, not torch.
    code = "\n".join(
        [
            "from __future__ import annotations",
            "import json, os, threading, time",
            "from pathlib import Path",
            "from typing import Any",
            "import numpy as np",
            inspect.getsource(hammer),
            f"print(json.dumps(hammer(factory={factory!r}, seconds=5.0)))",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    # A segfault (or any crash) shows here as a non-zero exit with faulthandler's stack dump.
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-4000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["problems"] == [], result["problems"]
    assert all(n > 20 for n in result["searches"]), result  # every searcher ran all along
    assert result["rounds"] >= 10 and result["saves"] >= 1, result
    assert result["ntotal"] == result["live"], result
    for op, seconds in result["max_op_s"].items():
        assert seconds < 1.0, f"a writer {op} waited {seconds:.2f} s behind the searches: {result}"


# -- 61: searches through the API while a bulk import indexes ------------------------------------
def _png(rng: np.random.Generator) -> bytes:
    from app.ingest.sources.datasets import png_bytes

    return png_bytes(rng.integers(0, 256, size=(28, 28), dtype=np.uint8))


def _tar(count: int, *, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for i in range(count):
            data = _png(rng)
            info = tarfile.TarInfo(f"bulk/{i:05d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def _search_round(
    server: LiveServer, queries: list[bytes], *, clients: int, until: Callable[[int], bool]
) -> tuple[list[float], list[int], list[str]]:
    """``clients`` threads search until ``until(count_so_far)``; latencies (s), ids seen, failures."""
    latencies: list[float] = []
    ids: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run(slot: int) -> None:
        with httpx.Client(base_url=f"{server.url}{API}", timeout=30) as http:
            i = slot
            while True:
                with lock:
                    if until(len(latencies)):
                        return
                began = time.perf_counter()
                response = http.post(
                    "/collections/bulk/search?k=10", files={"file": ("q.png", queries[i % len(queries)])}
                )
                elapsed = time.perf_counter() - began
                i += clients
                with lock:
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                    latencies.append(elapsed)
                    ids.extend(hit["id"] for hit in response.json()["hits"])

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(run, slot) for slot in range(clients)]:
            future.result(timeout=600)
    return latencies, ids, failures


@sqlite_pass_only
@pytest.mark.slow
@pytest.mark.load
@pytest.mark.timeout(600)
def test_r61_searches_during_a_bulk_import_all_succeed_see_only_stored_ids_and_stay_fast(tmp_path: Path):
    rng = np.random.default_rng(61)
    queries = [_png(rng) for _ in range(40)]
    server = LiveServer(tmp_path / "data", tmp_path / "server.log").start()
    try:
        assert (
            server.api("POST", "/collections", json={"name": "bulk", "embedder": "tiny"}).status_code == 201
        )
        for i in range(200):  # something to search before the import
            assert (
                server.api(
                    "POST", "/collections/bulk/images", files={"file": (f"s{i}.png", _png(rng))}
                ).status_code
                == 201
            )

        _search_round(server, queries, clients=8, until=lambda n: n >= 40)  # warm up
        baseline, _, failures = _search_round(server, queries, clients=8, until=lambda n: n >= 240)
        assert failures == []

        response = server.api(
            "POST", "/collections/bulk/imports", files={"file": ("bulk.tar", _tar(4000, seed=6))}
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        state = {"running": True}

        def watch() -> None:
            while server.api("GET", f"/jobs/{job_id}").json()["state"] in ("queued", "running"):
                time.sleep(0.2)
            state["running"] = False

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        during, seen, failures = _search_round(
            server, queries, clients=8, until=lambda _: not state["running"]
        )
        watcher.join(timeout=60)
        job = server.api("GET", f"/jobs/{job_id}").json()
    finally:
        server.stop()

    assert job["state"] == "succeeded" and job["added"] == 4000, job
    assert failures == [], failures[:5]
    assert len(during) >= 100, f"only {len(during)} searches ran while the import indexed"
    with sqlite3.connect(tmp_path / "data" / "cbir.sqlite3") as db:
        stored = {row[0] for row in db.execute("SELECT id FROM images")}
    assert set(seen) <= stored, sorted(set(seen) - stored)[:10]  # never an id the DB does not hold
    base_p95, during_p95 = _p95(baseline), _p95(during)
    print(f"search p95: {base_p95 * 1000:.1f} ms idle, {during_p95 * 1000:.1f} ms during the import")
    assert during_p95 <= 5 * base_p95, (
        f"p95 {during_p95 * 1000:.1f} ms during the import, {base_p95 * 1000:.1f} ms before"
    )


# -- 62: overload ----------------------------------------------------------------------------------
@sqlite_pass_only
@pytest.mark.fault
@pytest.mark.timeout(180)
def test_r62_uploads_beyond_the_embed_queue_get_a_fast_503_and_the_service_recovers(
    tmp_path: Path, make_png: Callable[..., bytes]
):
    # A queue of 4, and a server slow to store (each upload's write batch takes 0.5 s, under the
    # one write lock): 4 uploads hold every slot for seconds while 28 more arrive.
    env = {"CBIR_MAX_PENDING_EMBEDS": "4", "CBIR_FAULT_DELAY_AT": "store_batch:0.5"}
    server = LiveServer(tmp_path / "data", tmp_path / "server.log", env=env).start()
    try:
        assert (
            server.api("POST", "/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
        )
        images = [make_png(seed) for seed in range(32)]
        clients = [httpx.Client(base_url=f"{server.url}{API}", timeout=30) for _ in images]
        for http in clients:  # connected before the burst: the burst measures the server, not TCP set-up
            assert http.get("/health").status_code == 200
        start = threading.Barrier(len(images))

        def send(i: int) -> tuple[int, float, httpx.Response]:
            start.wait()
            began = time.perf_counter()
            response = clients[i].post("/collections/shapes/images", files={"file": (f"{i}.png", images[i])})
            return i, time.perf_counter() - began, response

        with ThreadPoolExecutor(max_workers=len(images)) as pool:
            outcomes = [f.result(timeout=120) for f in [pool.submit(send, i) for i in range(len(images))]]
        for http in clients:
            http.close()
        stored = {i for i, _, r in outcomes if r.status_code == 201}
        refused = [(seconds, r) for _, seconds, r in outcomes if r.status_code != 201]
        assert 4 <= len(stored) <= 8, [r.status_code for _, _, r in outcomes]
        for seconds, response in refused:
            assert_problem(response, 503, "overloaded")
            assert int(response.headers["retry-after"]) > 0
            assert seconds < 0.2, f"a refusal took {seconds * 1000:.0f} ms"
        slowest = max(seconds for seconds, _ in refused)
        print(f"{len(refused)} refused, the slowest in {slowest * 1000:.0f} ms; {len(stored)} stored")

        # Recovered: the slots are free again, a refused image uploads now, health is fine.
        retry = next(i for i in range(len(images)) if i not in stored)
        response = server.api("POST", "/collections/shapes/images", files={"file": ("r.png", images[retry])})
        assert response.status_code == 201, response.text
        health = server.api("GET", "/health").json()
        assert health["status"] == "ok" and health["collections"][0]["images"] == len(stored) + 1
        found = server.api("POST", "/collections/shapes/search?k=1", files={"file": ("q.png", images[retry])})
        assert found.status_code == 200 and found.json()["hits"][0]["id"] == response.json()["id"]
        assert "Traceback" not in server.tail(100_000)
    finally:
        server.stop()
