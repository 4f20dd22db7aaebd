"""``cbir bench search --http``: query by image over HTTP, one query per request against batches.

A ``cbir serve`` this run starts on 127.0.0.1 and a free port, on the data folder of the settings
(or the running service at ``--url``), answers ``POST /collections/{name}/search`` for each query
alone, one request at a time from one client (keep-alive), then the same queries through
``POST /collections/{name}/search/batch`` in requests of ``batch_size``. The queries are the
collection's own stored files, fetched through the API before any timing (a query finds itself
first; the latency of an exact or approximate search does not depend on that).

The client is ``http.client`` on one keep-alive connection, each multipart body built before its
clock starts. ``client_p50_ms`` is the median time from sending a request to having read its answer;
``server_p50_ms`` the median of the answers' ``timings_ms.total`` (decode, embed, search, fetch
inside the server); their ratio is what the HTTP layer adds per request (parsing, middlewares,
thread hops, JSON). ``speedup`` is the batch's queries per second over the single requests'.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


class _Client:
    """A lean keep-alive HTTP/1.1 client on a plain socket, each request's bytes built before its
    clock starts: what it times is the service's (a general client, httpx, cost about 0.7 ms more
    per request here, and ``http.client``'s header parsing about 0.1 ms: the client's time, not the
    service's). It reads a ``Content-Length`` or chunked answer and refuses anything else."""

    def __init__(self, url: str, *, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise BenchError(f"{url}: only http:// URLs are timed (put a TLS proxy's backend here)")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.sock = socket.create_connection((self.host, self.port), timeout=120.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, path: str, body: bytes, content_type: str) -> bytes:
        """The request's bytes: built before the clock starts."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.headers}"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    def post(self, path: str, body: bytes, content_type: str) -> tuple[float, dict[str, Any]]:
        """(milliseconds from sending to having read the answer, the parsed answer)."""
        message = self.request(path, body, content_type)
        started = time.perf_counter()
        self.sock.sendall(message)
        status, raw = self._answer()
        millis = (time.perf_counter() - started) * 1000
        if status != 200:
            raise BenchError(f"{path} answered {status}: {raw[:300]!r}")
        return millis, json.loads(raw)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise BenchError("the server closed the connection")
        self.buffer += chunk

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _answer(self) -> tuple[int, bytes]:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
        status_line, *lines = head.split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        status = int(status_line.split(" ", 2)[1])
        if "content-length" in fields:
            return status, self._take(int(fields["content-length"]))
        if fields.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self._line().split(b";", 1)[0], 16):
                chunks.append(self._take(size))
                self._take(2)
            while self._line():  # trailers, then the empty line
                pass
            return status, b"".join(chunks)
        raise BenchError(f"an answer without Content-Length or chunked encoding: {status_line}")

    def close(self) -> None:
        self.sock.close()


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    """(body, Content-Type) of a form with one ``file`` part per image, in order."""
    boundary = uuid.uuid4().hex
    chunks = []
    for i, data in enumerate(files):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q{i}.png"\r\n\r\n'
        chunks += [head.encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


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
    single_path = f"{API}/collections/{collection}/search?k={k}"
    batch_path = f"{API}/collections/{collection}/search/batch?k={k}"
    try:
        with httpx.Client(base_url=url, headers=headers or {}, timeout=120.0) as listing:
            files = _query_files(listing, collection, queries)
        say(f"{collection}: {len(files)} query images fetched; warming up")
        client = _Client(url, headers=headers or {})
        try:
            singles = [multipart([data]) for data in files]
            for body, content_type in singles[:WARMUP]:
                client.post(single_path, body, content_type)
            client_ms = np.empty(len(files))
            server_ms = np.empty(len(files))
            started = time.perf_counter()
            for i, (body, content_type) in enumerate(singles):
                client_ms[i], answer = client.post(single_path, body, content_type)
                server_ms[i] = answer["timings_ms"]["total"]
            single_s = time.perf_counter() - started
            say(f"single: {len(files) / single_s:.1f} queries/s; batches of {batch_size}")
            batches = [multipart(files[i : i + batch_size]) for i in range(0, len(files), batch_size)]
            client.post(batch_path, *batches[0])  # warm-up: the embedder's first batch of this size
            batch_ms = []
            started = time.perf_counter()
            for body, content_type in batches:
                millis, answer = client.post(batch_path, body, content_type)
                batch_ms.append(millis)
                if failed := [entry["error"] for entry in answer["results"] if entry["error"]]:
                    raise BenchError(f"a batch query failed: {failed[0]}")
            batch_s = time.perf_counter() - started
        finally:
            client.close()
    except (httpx.HTTPError, OSError, ValueError) as exc:
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
