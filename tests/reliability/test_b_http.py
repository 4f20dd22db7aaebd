"""Reliability plan, section B (HTTP layer limits), scenario 65 (CORS) and the page-security headers.

Bodies are capped by ``app/api/limits.py`` before anything parses them; security headers and CORS
come from ``app/api/headers.py``. Multipart bodies are built by hand here, so that they can be
malformed on purpose. Tests that need a real socket (a flood, a slow drip) run uvicorn through
``tests/liveserver.py``.
"""

from __future__ import annotations

import gc
import io
import itertools
import os
import re
import socket
import tempfile
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from starlette import formparsers

from app.api import limits, routes_images
from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import PROBLEM, assert_problem
from tests.liveserver import LiveServer

MiB = 1024 * 1024
CHUNK = 64 * 1024
STATIC = Path(__file__).resolve().parents[2] / "app" / "web" / "static"
TEMPLATES = Path(__file__).resolve().parents[2] / "app" / "web" / "templates"


# -- helpers -------------------------------------------------------------------------------------


def part(name: str, data: bytes, *, filename: str | None = None, boundary: bytes = b"B") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"Content-Disposition: {disposition}\r\n"
    if filename:
        head += "Content-Type: application/octet-stream\r\n"
    return b"--" + boundary + b"\r\n" + head.encode() + b"\r\n" + data + b"\r\n"


def multipart(*parts: bytes, boundary: bytes = b"B") -> bytes:
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


FORM = "multipart/form-data; boundary=B"


@pytest.fixture
def tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own TMPDIR: where Starlette spools uploads larger than 1 MiB."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def open_files_under(folder: Path) -> list[str]:
    """This process's open descriptors on files in ``folder`` (spooled files are unlinked at once,
    so a leaked one shows up here, not in a directory listing)."""
    gc.collect()
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Call counts: ``parse``, Starlette's multipart parser ran; ``handler``, the upload, search
    or compare handler ran (its first step, ``read_upload``)."""
    calls = {"parse": 0, "handler": 0}
    original_parse = formparsers.MultiPartParser.parse
    original_read = routes_images.read_upload

    async def parse(self: formparsers.MultiPartParser) -> Any:
        calls["parse"] += 1
        return await original_parse(self)

    async def read_upload(*args: Any, **kwargs: Any) -> bytes:
        calls["handler"] += 1
        return await original_read(*args, **kwargs)

    monkeypatch.setattr(formparsers.MultiPartParser, "parse", parse)
    monkeypatch.setattr(routes_images, "read_upload", read_upload)
    return calls


def call_streamed(
    client: TestClient,
    path: str,
    chunks: Iterator[bytes],
    *,
    content_type: str = FORM,
    delay: float = 0.0,
) -> tuple[int, dict[str, str], bytes, int]:
    """Drive the app in-process with a chunked body (no Content-Length), ``delay`` seconds before
    each chunk. Returns status, headers, body and how many chunks the app pulled. An exception out
    of the app (what a server turns into a 500 and a log line) fails the test."""
    pulled = 0
    status = 0
    headers: dict[str, str] = {}
    body = bytearray()

    async def run() -> None:
        nonlocal pulled, status, headers
        done = anyio.Event()
        exhausted = False

        async def receive() -> dict[str, Any]:
            nonlocal pulled, exhausted
            if exhausted:
                await done.wait()
                return {"type": "http.disconnect"}
            if delay:
                await anyio.sleep(delay)
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
                return {"type": "http.request", "body": b"", "more_body": False}
            pulled += 1
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"testserver"),
                (b"content-type", content_type.encode()),
                (b"transfer-encoding", b"chunked"),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        }
        await client.app(scope, receive, send)

    assert client.portal is not None
    client.portal.call(run)
    return status, headers, bytes(body), pulled


def problem_of(status: int, headers: dict[str, str], body: bytes, expected: int, code: str) -> None:
    import json

    assert status == expected, body
    assert headers["content-type"] == PROBLEM
    assert json.loads(body)["code"] == code


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One uvicorn for the module: 2 MiB uploads, a 2 s body deadline, a "shapes" collection."""
    folder = tmp_path_factory.mktemp("live")
    server = LiveServer(
        folder / "data",
        folder / "server.log",
        env={
            "CBIR_DEFAULT_EMBEDDER": "tiny",
            "CBIR_MAX_UPLOAD_BYTES": str(2 * MiB),
            "CBIR_MAX_ARCHIVE_BYTES": str(64 * MiB),
            "CBIR_BODY_TIMEOUT_S": "2",
            "CBIR_IMPORT_PROCESSES": "false",
        },
    )
    try:
        server.start()
        created = server.api("POST", "/collections", json={"name": "shapes", "embedder": "tiny"})
        assert created.status_code == 201, created.text
        yield server
    finally:
        server.stop()


def raw_request(url: str, head: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode())
    return sock


def read_response(sock: socket.socket) -> bytes:
    """What the server sent before it closed the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def health_times(url: str, stop: threading.Event) -> list[float]:
    """/health response times while ``stop`` is not set (a second client, in a thread)."""
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=10) as other:
        while not stop.is_set():
            started = time.monotonic()
            assert other.get("/api/v1/health").status_code == 200
            times.append(time.monotonic() - started)
            time.sleep(0.1)
    return times


# -- 15, 16: body caps -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_r15_content_length_over_cap_refused_before_parsing(
    client: TestClient, settings: Settings, collection: str, tmpdir: Path, spies: dict[str, int]
) -> None:
    for path in (f"/api/v1/collections/{collection}/images", f"/api/v1/collections/{collection}/search"):
        cap = limits.body_cap(settings, path)
        assert cap == settings.max_upload_bytes + limits.MULTIPART_OVERHEAD
        response = client.post(path, content=b"x" * (cap + 1), headers={"content-type": FORM})
        assert_problem(response, 413, "payload_too_large")
        assert response.headers["connection"] == "close"
    imports = f"/api/v1/collections/{collection}/imports"
    cap = limits.body_cap(settings, imports)
    assert cap == settings.max_archive_bytes + limits.MULTIPART_OVERHEAD
    assert_problem(
        client.post(imports, content=b"x" * (cap + 1), headers={"content-type": FORM}),
        413,
        "payload_too_large",
    )
    assert spies["parse"] == 0 and spies["handler"] == 0
    assert leftovers(tmpdir) == [] and leftovers(settings.tmp_dir) == []
    assert leftovers(settings.uploads_dir) == []


@pytest.mark.timeout(60)
def test_r15_file_of_exactly_the_limit_reaches_the_handler(
    client: TestClient, settings: Settings, collection: str, spies: dict[str, int]
) -> None:
    """The cap leaves room for the multipart framing: a file of max_upload_bytes is not cut."""
    body = multipart(part("file", b"\0" * settings.max_upload_bytes, filename="big.png"))
    response = client.post(
        f"/api/v1/collections/{collection}/images", content=body, headers={"content-type": FORM}
    )
    assert spies["handler"] == 1
    assert response.status_code in (415, 422), response.text  # not an image, but read in full
    over = multipart(part("file", b"\0" * (settings.max_upload_bytes + 1), filename="big.png"))
    response = client.post(
        f"/api/v1/collections/{collection}/images", content=over, headers={"content-type": FORM}
    )
    assert_problem(response, 413, "payload_too_large")


@pytest.mark.timeout(60)
def test_r16_chunked_body_over_cap_is_413_without_temp_files(
    client: TestClient, settings: Settings, collection: str, tmpdir: Path, spies: dict[str, int]
) -> None:
    cap = limits.body_cap(settings, f"/api/v1/collections/{collection}/images")
    chunks = cap // CHUNK + 20

    def body() -> Iterator[bytes]:
        yield part("file", b"", filename="x.png")[:-2]  # an open file part...
        for _ in range(chunks):
            yield b"\x89" * CHUNK  # ...that never ends

    response = client.post(
        f"/api/v1/collections/{collection}/images", content=body(), headers={"content-type": FORM}
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload_too_large")
    assert spies["handler"] == 0

    # Streamed for real, 64 KiB per receive(): the app stops pulling right at the cap.
    status, headers, raw, pulled = call_streamed(client, f"/api/v1/collections/{collection}/images", body())
    problem_of(status, headers, raw, 413, "payload_too_large")
    assert pulled <= cap // CHUNK + 2 < chunks
    status, headers, raw, pulled = call_streamed(client, f"/api/v1/collections/{collection}/search", body())
    problem_of(status, headers, raw, 413, "payload_too_large")
    assert spies["handler"] == 0
    assert leftovers(tmpdir) == [] and open_files_under(tmpdir) == []
    assert leftovers(settings.tmp_dir) == []
    assert client.get("/api/v1/health").status_code == 200


@pytest.mark.timeout(60)
def test_r16_chunked_archive_over_cap_leaves_no_upload(
    client: TestClient, settings: Settings, collection: str, tmpdir: Path
) -> None:
    path = f"/api/v1/collections/{collection}/imports"
    cap = limits.body_cap(settings, path)

    def body() -> Iterator[bytes]:
        yield part("file", b"", filename="a.zip")[:-2]
        for _ in range(cap // CHUNK + 10):
            yield b"PK" * (CHUNK // 2)

    status, headers, raw, pulled = call_streamed(client, path, body())
    problem_of(status, headers, raw, 413, "payload_too_large")
    assert pulled <= cap // CHUNK + 2
    assert leftovers(settings.tmp_dir) == [] and leftovers(settings.uploads_dir) == []
    assert leftovers(tmpdir) == [] and open_files_under(tmpdir) == []
    assert client.get("/api/v1/jobs").json()["jobs"] == []


@pytest.mark.timeout(30)
def test_r16_slow_body_times_out_in_process(settings: Settings) -> None:
    """The body deadline, without a socket: a receive() that stalls gets a 408 problem."""
    fast = settings.model_copy(update={"body_timeout_s": 0.5})
    with TestClient(create_app(fast), raise_server_exceptions=False) as client:
        started = time.monotonic()
        status, headers, raw, pulled = call_streamed(
            client, "/api/v1/collections/shapes/images", iter([b"-"] * 100), delay=0.2
        )
        problem_of(status, headers, raw, 408, "body_timeout")
        assert time.monotonic() - started < 5
        assert pulled <= 4  # cut after about 0.5 s of 0.2 s gaps, not after all 100 bytes
        assert client.get("/api/v1/health").status_code == 200


# -- 17, 18: multipart parts ---------------------------------------------------------------------


ROUTES = ["images", "search", "imports"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["fields", "files"])
def test_r17_too_many_parts_is_a_quick_problem(
    client: TestClient, collection: str, tmpdir: Path, route: str, kind: str
) -> None:
    if kind == "fields":
        parts = [part(f"f{i}", b"v") for i in range(2000)]
    else:
        parts = [part("file", b"", filename=f"{i}.png") for i in range(2000)]
    body = multipart(*parts)
    started = time.monotonic()
    response = client.post(
        f"/api/v1/collections/{collection}/{route}", content=body, headers={"content-type": FORM}
    )
    elapsed = time.monotonic() - started
    assert response.status_code in (400, 413), response.text
    assert_problem(response, response.status_code)
    assert "Too many" in response.json()["detail"]
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert client.get("/api/v1/health").status_code == 200
    assert leftovers(tmpdir) == [] and open_files_under(tmpdir) == []


@pytest.mark.timeout(60)
def test_r18_huge_field_refused(client: TestClient, settings: Settings, collection: str) -> None:
    huge = multipart(part("metadata", b"7" * (10 * MiB)), part("file", b"x", filename="a.png"))
    for route in ("images", "search"):
        response = client.post(
            f"/api/v1/collections/{collection}/{route}", content=huge, headers={"content-type": FORM}
        )
        assert_problem(response, 413, "payload_too_large")  # over the body cap: never parsed
    # Under the body cap, the parser's own part limit (1 MiB for a non-file field) applies.
    big = multipart(part("metadata", b"7" * (3 * MiB // 2)), part("file", b"x", filename="a.png"))
    response = client.post(
        f"/api/v1/collections/{collection}/images", content=big, headers={"content-type": FORM}
    )
    assert_problem(response, 400, "bad_request")
    assert "maximum size" in response.json()["detail"]
    response = client.post(
        f"/api/v1/collections/{collection}/imports", content=huge, headers={"content-type": FORM}
    )
    assert_problem(response, 400, "bad_multipart")


@pytest.mark.timeout(60)
def test_r18_huge_field_memory_stays_bounded(client: TestClient, collection: str) -> None:
    """A 10 MiB field streamed to the imports route (whose cap it is under): the parser stops at
    its part limit, so memory peaks far below the field's size."""

    def body() -> Iterator[bytes]:
        yield b'--B\r\nContent-Disposition: form-data; name="manifest_text"\r\n\r\n'
        for _ in range(10 * MiB // CHUNK):
            yield b"7" * CHUNK
        yield b"\r\n--B--\r\n"

    tracemalloc.start()
    try:
        status, headers, raw, pulled = call_streamed(
            client, f"/api/v1/collections/{collection}/imports", body()
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    problem_of(status, headers, raw, 400, "bad_multipart")
    assert pulled < 10 * MiB // CHUNK
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB"


# -- 19: preamble and epilogue floods (live server) ----------------------------------------------


FLOOD = b"\r\n" * (5 * MiB // 2)


def flood_body(png: bytes) -> bytes:
    return FLOOD + multipart(part("file", png, filename="q.png")) + FLOOD


@pytest.mark.timeout(180)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_r19_preamble_epilogue_flood_answers_fast(
    live: LiveServer, make_png: Callable[..., bytes], framing: str
) -> None:
    body = flood_body(make_png(1))
    stop = threading.Event()
    times: list[float] = []
    poller = threading.Thread(target=lambda: times.extend(health_times(live.url, stop)))
    poller.start()
    try:
        time.sleep(0.3)
        head = f"POST /api/v1/collections/shapes/images HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n" + (
            f"Content-Length: {len(body)}\r\n\r\n"
            if framing == "content-length"
            else "Transfer-Encoding: chunked\r\n\r\n"
        )
        started = time.monotonic()
        sock = raw_request(live.url, head)

        def send_body() -> None:
            try:
                for i in range(0, len(body), CHUNK):
                    piece = body[i : i + CHUNK]
                    sock.sendall(
                        piece if framing == "content-length" else b"%x\r\n%s\r\n" % (len(piece), piece)
                    )
                if framing == "chunked":
                    sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed before taking it all

        sender = threading.Thread(target=send_body)
        sender.start()
        response = read_response(sock)
        elapsed = time.monotonic() - started
        sender.join(timeout=30)
        sock.close()
        time.sleep(0.5)
    finally:
        stop.set()
        poller.join(timeout=30)
    assert re.match(rb"HTTP/1.1 (413|400) ", response), response[:300]
    assert b"application/problem+json" in response
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert times and max(times) < 1.0, times
    assert live.process is not None and live.process.poll() is None
    assert live.api("GET", "/health").status_code == 200


@pytest.mark.timeout(60)
def test_r19_flood_through_the_parser_is_fast(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    """Past the cap check (the imports route takes big bodies) the parser itself skips 10 MiB of
    CR/LF in well under a second (python-multipart before 0.0.18 took minutes)."""
    body = flood_body(b"not a zip")
    started = time.monotonic()
    response = client.post(
        f"/api/v1/collections/{collection}/imports", content=body, headers={"content-type": FORM}
    )
    elapsed = time.monotonic() - started
    assert_problem(response, 415, "unsupported_archive")
    assert elapsed < 3, f"{elapsed:.1f} s"


# -- 20: malicious Content-Type parameters -------------------------------------------------------


BAD_CONTENT_TYPES = {
    "long boundary": "multipart/form-data; boundary=" + "a" * 100_000,
    "escaped quotes": 'multipart/form-data; boundary="' + '\\"' * 50_000 + '"',
    "many parameters": "multipart/form-data; " + "x=y; " * 20_000 + "boundary=B",
    "71 characters": "multipart/form-data; boundary=" + "b" * 71,
    "redos spaces": "multipart/form-data; boundary=" + "a " * 34 + "!",
    "no boundary": "multipart/form-data",
    "empty boundary": "multipart/form-data; boundary=",
    "two boundaries": "multipart/form-data; boundary=B; boundary=C",
    "open quote": 'multipart/form-data; boundary="B',
    "trailing space": 'multipart/form-data; boundary="B "',
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content_type", BAD_CONTENT_TYPES.values(), ids=BAD_CONTENT_TYPES.keys())
def test_r20_malicious_content_type_is_400(
    client: TestClient, collection: str, make_png: Callable[..., bytes], content_type: str
) -> None:
    body = multipart(part("file", make_png(1), filename="q.png"))
    for route in ROUTES:
        started = time.monotonic()
        response = client.post(
            f"/api/v1/collections/{collection}/{route}", content=body, headers={"content-type": content_type}
        )
        assert time.monotonic() - started < 1.0, route
        assert_problem(response, 400, "bad_multipart")


@pytest.mark.timeout(30)
def test_r20_ordinary_boundaries_still_work(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    quoted = multipart(
        part("file", make_png(2), filename="q.png", boundary=b"x'()+_,-./:=? y"), boundary=b"x'()+_,-./:=? y"
    )
    response = client.post(
        f"/api/v1/collections/{collection}/images",
        content=quoted,
        headers={"content-type": 'Multipart/Form-Data; charset=utf-8; boundary="x\'()+_,-./:=? y"'},
    )
    assert response.status_code == 201, response.text
    response = client.post(f"/api/v1/collections/{collection}/images", files={"file": ("a.png", make_png(3))})
    assert response.status_code == 201, response.text


# -- 21: slow drip (live server) -----------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["/api/v1/collections/shapes/images", "/api/v1/collections"])
def test_r21_slow_drip_body_is_cut_and_others_served(live: LiveServer, path: str) -> None:
    stop = threading.Event()
    times: list[float] = []
    poller = threading.Thread(target=lambda: times.extend(health_times(live.url, stop)))
    poller.start()
    try:
        content_type = FORM if path.endswith("images") else "application/json"
        sock = raw_request(
            live.url,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 1000\r\n\r\n",
        )
        # A well-formed start, a byte a second: only the deadline may end it (dashes alone would
        # break the multipart parser at the third byte, racing the deadline).
        drip = itertools.cycle(b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n')
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.05)
        while time.monotonic() - started < 30:
            try:
                sock.sendall(bytes([next(drip)]))
            except OSError:
                break  # closed by the server
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                time.sleep(0.95)  # one byte a second
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
            head, _, rest = answer.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head, flags=re.I)
            if length and len(rest) >= int(length.group(1)):
                break  # a whole answer: whether the server also closed does not matter
        elapsed = time.monotonic() - started
        sock.close()
    finally:
        stop.set()
        poller.join(timeout=30)
    # 2 s of CBIR_BODY_TIMEOUT_S (plus 1000 bytes' worth of the 64 KiB/s allowance)
    assert 1.5 < elapsed < 10, f"{elapsed:.1f} s, answer {answer[:200]!r}, server log: {live.tail()}"
    if answer:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"code":"body_timeout"' in answer
    assert len(times) >= 5 and max(times) < 1.0, times
    assert live.api("GET", "/health").status_code == 200


# -- 22: temp-file hygiene -----------------------------------------------------------------------


def tiny_zip(png: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("a/one.png", png)
    return out.getvalue()


@pytest.mark.timeout(120)
def test_r22_no_temp_files_after_50_mixed_uploads(
    client: TestClient, settings: Settings, collection: str, tmpdir: Path, make_png: Callable[..., bytes]
) -> None:
    images = f"/api/v1/collections/{collection}/images"
    cap = limits.body_cap(settings, images)
    big_png = make_png(7, size=(800, 800), mode="RGB")  # over 1 MiB: spooled to TMPDIR
    assert MiB < len(big_png) < settings.max_upload_bytes
    statuses: dict[int, int] = {}

    def oversized() -> Iterator[bytes]:
        yield part("file", b"", filename="x.png")[:-2]
        for _ in range(cap // CHUNK + 4):
            yield b"\0" * CHUNK

    for i in range(50):
        kind = i % 10
        if kind == 0:
            response = client.post(images, files={"file": (f"{i}.png", make_png(1000 + i))})
        elif kind == 1:
            response = client.post(images, files={"file": ("big.png", big_png)})  # 201, then 200
        elif kind == 2:
            response = client.post(images, content=b"\0" * (cap + 1), headers={"content-type": FORM})
        elif kind == 3:
            response = client.post(images, content=oversized(), headers={"content-type": FORM})
        elif kind == 4:
            response = client.post(images, files={"file": ("cut.png", big_png[: len(big_png) // 2])})
        elif kind == 5:
            body = multipart(*(part("file", b"", filename=f"{n}.png") for n in range(50)))
            response = client.post(images, content=body, headers={"content-type": FORM})
        elif kind == 6:
            response = client.post(
                images, content=part("file", big_png, filename="q.png"), headers={"content-type": FORM}
            )
        elif kind == 7:
            response = client.post(
                f"/api/v1/collections/{collection}/search", files={"file": ("q.png", big_png)}
            )
        elif kind == 8:
            archive = tiny_zip(make_png(2000 + i))
            response = client.post(
                f"/api/v1/collections/{collection}/imports", files={"file": ("a.zip", archive)}
            )
        else:
            response = client.post(
                f"/api/v1/collections/{collection}/imports", files={"file": ("a.zip", b"PK\x03\x04 torn")}
            )
        assert response.status_code < 500, response.text
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert statuses.get(201, 0) >= 5 and statuses.get(202, 0) == 5
    assert sum(n for status, n in statuses.items() if status >= 400) >= 30, statuses
    deadline = time.monotonic() + 60
    while any(job["state"] in ("queued", "running") for job in client.get("/api/v1/jobs").json()["jobs"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert leftovers(tmpdir) == [] and open_files_under(tmpdir) == []
    assert leftovers(settings.tmp_dir) == []
    assert leftovers(settings.uploads_dir) == []


@pytest.mark.timeout(60)
def test_r22_unterminated_multipart_is_400_and_closes_its_spooled_file(
    client: TestClient, collection: str, tmpdir: Path, make_png: Callable[..., bytes]
) -> None:
    """A body that stops inside a file part (no close delimiter): Starlette alone answers 422
    (no ``file``) and keeps the part's spooled file open; the middleware refuses it first."""
    big_png = make_png(8, size=(800, 800), mode="RGB")
    for route in ("images", "search", "imports"):
        for body in (
            part("file", big_png, filename="q.png"),
            part("file", big_png, filename="q.png")[:-2],
            b"",
        ):
            response = client.post(
                f"/api/v1/collections/{collection}/{route}", content=body, headers={"content-type": FORM}
            )
            assert_problem(response, 400, "bad_multipart")
            assert "closing boundary" in response.json()["detail"]
    # the close delimiter split across two receive() messages is still found
    whole = multipart(part("file", make_png(9), filename="q.png"))
    for cut in (len(whole) - 3, len(whole) - 5, len(whole) - 7):
        status, _, raw, _ = call_streamed(
            client, f"/api/v1/collections/{collection}/images", iter([whole[:cut], whole[cut:]])
        )
        assert status in (200, 201), raw
    assert leftovers(tmpdir) == [] and open_files_under(tmpdir) == []


# -- 65: CORS ------------------------------------------------------------------------------------


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def test_r65_cors_off_by_default(client: TestClient) -> None:
    for origin in ("http://evil.test", "http://testserver"):
        preflight = client.options("/api/v1/collections", headers={"Origin": origin, **PREFLIGHT})
        assert "access-control-allow-origin" not in preflight.headers
        simple = client.get("/api/v1/collections", headers={"Origin": origin})
        assert simple.status_code == 200
        assert not [h for h in simple.headers if h.startswith("access-control-")]


@pytest.mark.parametrize("credentials", [False, True])
def test_r65_cors_echoes_only_the_configured_origin(settings: Settings, credentials: bool) -> None:
    configured = Settings(
        **{
            **settings.model_dump(),
            "cors_origins": ["https://app.example"],
            "cors_allow_credentials": credentials,
        }
    )
    with TestClient(create_app(configured), raise_server_exceptions=False) as client:
        good = client.options("/api/v1/collections", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert good.status_code == 200
        assert good.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in good.headers["access-control-allow-methods"]
        assert ("access-control-allow-credentials" in good.headers) is credentials
        evil = client.options("/api/v1/collections", headers={"Origin": "http://evil.test", **PREFLIGHT})
        assert "access-control-allow-origin" not in evil.headers
        assert evil.status_code == 400
        simple = client.get("/api/v1/collections", headers={"Origin": "https://app.example"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        assert (
            "access-control-allow-origin"
            not in client.get("/api/v1/collections", headers={"Origin": "http://evil.test"}).headers
        )
        # a refusal from the body limits is still readable by the configured origin
        refused = client.post(
            "/api/v1/collections/x/images",
            content=b"x" * (limits.body_cap(configured, "/api/v1/collections/x/images") + 1),
            headers={"Origin": "https://app.example", "content-type": FORM},
        )
        assert refused.status_code == 413
        assert refused.headers["access-control-allow-origin"] == "https://app.example"


def test_r65_wildcard_with_credentials_refused_at_start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="CORS"):
        Settings(**{**settings.model_dump(), "cors_origins": ["*"], "cors_allow_credentials": True})
    monkeypatch.setenv("CBIR_CORS_ORIGINS", '["https://a.example", "*"]')
    monkeypatch.setenv("CBIR_CORS_ALLOW_CREDENTIALS", "true")
    with pytest.raises(ValueError, match="CORS"):
        Settings()
    # settings built without validation still cannot reach a running app
    unchecked = settings.model_copy(update={"cors_origins": ["*"], "cors_allow_credentials": True})
    with pytest.raises(ValueError, match="CORS"):
        create_app(unchecked)
    # "*" without credentials is allowed: any site may read, none with the user's cookies
    monkeypatch.setenv("CBIR_CORS_ALLOW_CREDENTIALS", "false")
    assert Settings().cors_origins == ["https://a.example", "*"]


# -- page security: CSP, nosniff, true media types -----------------------------------------------


CSP_DIRECTIVES = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
}


@pytest.mark.parametrize("page", ["/", "/browse", "/import", "/evaluate", "/map"])
def test_pages_have_a_strict_content_security_policy(client: TestClient, collection: str, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = dict(
        (d.split(" ", 1) + [""])[:2]
        for d in (p.strip() for p in response.headers["content-security-policy"].split(";"))
    )
    for directive, value in CSP_DIRECTIVES.items():
        assert policy[directive] == value, (directive, policy)
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert "unsafe-eval" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


def test_page_markup_and_scripts_need_no_inline_code() -> None:
    """What the CSP forbids is absent: inline scripts and styles, handler attributes, eval."""
    for template in TEMPLATES.glob("*.html"):
        html = template.read_text()
        for tag in re.findall(r"<script\b[^>]*>", html, flags=re.I):
            assert re.search(r'\bsrc="/static/[\w.-]+\.js"', tag), (template.name, tag)
        assert not re.search(r"<script\b[^>]*>\s*[^<\s]", html, flags=re.I), template.name
        assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=|javascript:", html, flags=re.I), template.name
    for script in STATIC.glob("*.js"):
        code = script.read_text()
        assert not re.search(
            r"\beval\(|new Function\(|innerHTML|outerHTML|insertAdjacentHTML|document\.write|"
            r"setAttribute\(\s*[\"'](style|on\w+)[\"']|setTimeout\(\s*[\"']",
            code,
        ), script.name


def test_every_response_is_nosniff(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    uploaded = client.post(f"/api/v1/collections/{collection}/images", files={"file": ("a.png", make_png(5))})
    image_id = uploaded.json()["id"]
    for response in (
        uploaded,
        client.get("/api/v1/health"),
        client.get("/api/v1/collections/nope"),  # a problem
        client.get("/static/app.js"),
        client.get("/openapi.json"),
        client.get(f"/api/v1/images/{image_id}/file"),
        client.post(f"/api/v1/collections/{collection}/images", content=b"x", headers={"content-type": FORM}),
    ):
        assert response.headers["x-content-type-options"] == "nosniff", response.request.url
        # A policy on HTML; on stored images the sandbox (finding 13 of issue 14); none elsewhere.
        policy = response.headers.get("content-security-policy")
        kind = response.headers["content-type"]
        assert policy is None or kind.startswith("text/html") or policy.startswith("sandbox;"), kind


def test_server_errors_are_nosniff_too(settings: Settings) -> None:
    app = create_app(settings)

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert_problem(response, 500, "internal_error")
    assert response.headers["x-content-type-options"] == "nosniff"


def test_docs_page_gets_its_own_policy(client: TestClient) -> None:
    response = client.get("/docs")
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy


@pytest.mark.parametrize(
    ("image_format", "media_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")],
)
def test_stored_images_served_with_their_true_type(
    client: TestClient, collection: str, image_format: str, media_type: str
) -> None:
    """Whatever name and Content-Type the upload claimed, the file comes back as what it is."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, format=image_format)
    uploaded = client.post(
        f"/api/v1/collections/{collection}/images",
        files={"file": ("evil.html", out.getvalue(), "text/html")},
    )
    assert uploaded.status_code == 201, uploaded.text
    for path in ("file", "thumbnail"):
        served = client.get(f"/api/v1/images/{uploaded.json()['id']}/{path}")
        assert served.status_code == 200
        assert served.headers["content-type"] == media_type
        assert served.headers["x-content-type-options"] == "nosniff"
        assert served.headers["content-security-policy"].startswith("sandbox;")
