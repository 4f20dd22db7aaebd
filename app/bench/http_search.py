"""``cbir bench search --http``: query by image over HTTP, one query per request against batches.

A ``cbir serve`` this run starts on 127.0.0.1 and a free port, on the data folder of the settings
(or the running service at ``--url``), answers ``POST /collections/{name}/search`` for each query
alone, one request at a time from one client (keep-alive), then the same queries through
``POST /collections/{name}/search/batch`` in requests of ``batch_size``. The queries are the
collection's own stored files, fetched through the API before any timing (a query finds itself
first; the latency of an exact or approximate search does not depend on that).

``client_p50_ms`` is the median time from sending a request to having read its answer;
``server_p50_ms`` the median of the answers' ``timings_ms.total`` (decode, embed, search, fetch
inside the server); their ratio is what the HTTP layer adds per request (parsing, middlewares,
thread hops, JSON). ``speedup`` is the batch's queries per second over the single requests'.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.bench.embedding import BenchError
from app.core.settings import Settings

API = "/api/v1"
WARMUP = 10  # single requests before the timed ones (connection, caches, the embedder's first load)
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class HttpBench:
    collection: str
    url: str
    queries: int
    k: int
    single_qps: float
    client_p50_ms: float
    client_p95_ms: float
    server_p50_ms: float
    batch_size: int
    batch_qps: float
    batch_client_p50_ms: float

    @property
    def ratio(self) -> float:
        return self.client_p50_ms / self.server_p50_ms if self.server_p50_ms else float("nan")

    def summary(self) -> dict[str, Any]:
        """The members ``--json`` prints for the HTTP mode."""
        return {
            "collection": self.collection,
            "url": self.url,
            "queries": self.queries,
            "k": self.k,
            "single": {
                "qps": round(self.single_qps, 1),
                "client_p50_ms": round(self.client_p50_ms, 3),
                "client_p95_ms": round(self.client_p95_ms, 3),
                "server_p50_ms": round(self.server_p50_ms, 3),
                "client_server_ratio": round(self.ratio, 3),
            },
            "batch": {
                "size": self.batch_size,
                "qps": round(self.batch_qps, 1),
                "client_p50_ms": round(self.batch_client_p50_ms, 3),
                "speedup": round(self.batch_qps / self.single_qps, 2),
            },
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(settings: Settings, *, say: Callable[[str], None]) -> Iterator[str]:
    """``cbir serve`` on 127.0.0.1 and a free port, with this process's CBIR_* environment (so the
    same data folder and database); its log goes to a file under CBIR_TMP_DIR, removed at the end
    unless the server failed to start."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.mkstemp(dir=settings.tmp_dir, prefix="bench-serve-", suffix=".log")[1])
    root = str(Path(__file__).resolve().parents[2])  # this checkout's app, whatever the cwd
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "CBIR_DATA_DIR": str(settings.data_dir),
        "CBIR_HOST": "127.0.0.1",
        "PYTHONPATH": path,
    }
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise BenchError(f"the server exited with status {process.returncode}; its log: {log}")
            try:
                if httpx.get(f"{url}{API}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not answer within {START_TIMEOUT_S:.0f} s; its log: {log}")
            time.sleep(0.2)
        say(f"server: {url} (pid {process.pid})")
        yield url
        log.unlink(missing_ok=True)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def server(settings: Settings, *, url: str | None, say: Callable[[str], None]) -> Iterator[str]:
    """``url`` (a running service), or a ``live_server`` started for this run."""
    if url is not None:
        yield url.rstrip("/")
        return
    with live_server(settings, say=say) as started:
        yield started


def _query_files(client: httpx.Client, collection: str, count: int) -> list[bytes]:
    """``count`` stored files of the collection (repeated when it holds fewer), fetched through the API."""
    listing = client.get(f"{API}/collections/{collection}/images", params={"limit": min(count, 500)})
    if listing.status_code == 404:
        raise BenchError(f"no collection named {collection!r} at {client.base_url}")
    listing.raise_for_status()
    items = listing.json()
    if not items:
        raise BenchError(f"collection {collection!r} holds no images to query with")
    files = [client.get(item["image_url"]).content for item in items[:count]]
    return [files[i % len(files)] for i in range(count)]


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise BenchError(
            f"{response.request.url.path} answered {response.status_code}: {response.text[:300]}"
        )
    return response.json()  # type: ignore[no-any-return]


def run_http(
    *,
    url: str,
    collection: str,
    queries: int,
    k: int,
    batch_size: int,
    headers: dict[str, str] | None = None,
    say: Callable[[str], None] = print,
) -> HttpBench:
    """Time ``queries`` single searches one request at a time, then the same queries in batches."""
    search = f"{API}/collections/{collection}/search"
    try:
        with httpx.Client(base_url=url, headers=headers or {}, timeout=120.0) as client:
            files = _query_files(client, collection, queries)
            say(f"{collection}: {len(files)} query images fetched; warming up")
            for data in files[:WARMUP]:
                _check(client.post(search, params={"k": k}, files={"file": ("q.png", data)}))
            client_ms = np.empty(len(files))
            server_ms = np.empty(len(files))
            started = time.perf_counter()
            for i, data in enumerate(files):
                sent = time.perf_counter()
                body = _check(client.post(search, params={"k": k}, files={"file": ("q.png", data)}))
                client_ms[i] = (time.perf_counter() - sent) * 1000
                server_ms[i] = body["timings_ms"]["total"]
            single_s = time.perf_counter() - started
            say(f"single: {len(files) / single_s:.1f} queries/s; batches of {batch_size}")
            _check(client.post(f"{search}/batch", params={"k": k}, files=_parts(files[:batch_size])))
            batch_ms = []
            started = time.perf_counter()
            for start in range(0, len(files), batch_size):
                sent = time.perf_counter()
                body = _check(
                    client.post(
                        f"{search}/batch", params={"k": k}, files=_parts(files[start : start + batch_size])
                    )
                )
                batch_ms.append((time.perf_counter() - sent) * 1000)
                if failed := [entry["error"] for entry in body["results"] if entry["error"]]:
                    raise BenchError(f"a batch query failed: {failed[0]}")
            batch_s = time.perf_counter() - started
    except httpx.HTTPError as exc:
        raise BenchError(f"{url}: {exc}") from None
    return HttpBench(
        collection=collection,
        url=url,
        queries=len(files),
        k=k,
        single_qps=len(files) / single_s,
        client_p50_ms=float(np.percentile(client_ms, 50)),
        client_p95_ms=float(np.percentile(client_ms, 95)),
        server_p50_ms=float(np.percentile(server_ms, 50)),
        batch_size=batch_size,
        batch_qps=len(files) / batch_s,
        batch_client_p50_ms=float(np.percentile(batch_ms, 50)),
    )


def _parts(files: list[bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (f"q{i}.png", data)) for i, data in enumerate(files)]


def table(result: HttpBench) -> str:
    s = result.summary()
    single, batch = s["single"], s["batch"]
    return "\n".join(
        [
            f"{result.collection} at {result.url}: {result.queries} queries, k = {result.k}, one client",
            "",
            "| Mode | Queries/s | Client p50 ms | Server p50 ms | Client / server |",
            "| --- | --- | --- | --- | --- |",
            f"| single | {single['qps']:.1f} | {single['client_p50_ms']:.2f} | {single['server_p50_ms']:.2f} "
            f"| {single['client_server_ratio']:.2f} |",
            f"| batch of {batch['size']} | {batch['qps']:.1f} (x{batch['speedup']:.1f}) "
            f"| {batch['client_p50_ms']:.2f} | - | - |",
        ]
    )
