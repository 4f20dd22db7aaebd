"""Section E of the reliability plan: URL imports and server-side request forgery (37, 38, 40, 41).

Everything runs on loopback: a recording server that must never be reached, and a fixture server
(redirects, hostile answers) reached only through the test-only allow rule
``url_allow_test_hosts={"fixture.test": "127.0.0.1:PORT"}``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import ipaddress
import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from app.cli import main
from app.core.errors import CbirError
from app.core.redaction import redact_url
from app.core.settings import Settings, get_settings
from app.ingest.sources import fetch as fetcher
from app.ingest.sources.fetch import FetchPolicy, blocked_reason, fetch, parse_url
from app.ingest.sources.kinds import UrlSource, describe, from_params, members_of
from app.main import create_app
from tests.api.helpers import assert_problem

API = "/api/v1"
FIXTURE = "http://fixture.test"


# -- fixture data ----------------------------------------------------------------------------
def png_bytes(seed: int = 0, size: tuple[int, int] = (16, 16)) -> bytes:
    image = Image.frombytes("L", size, bytes((seed * 7 + i * 13) % 256 for i in range(size[0] * size[1])))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def pixel_bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header declaring width x height, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


@functools.cache
def gzip_bomb(megabytes: int = 64) -> bytes:
    """gzip of ``megabytes`` MiB of zeros: about 64 KiB on the wire."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as handle:
        block = b"\x00" * (1 << 20)
        for _ in range(megabytes):
            handle.write(block)
    return out.getvalue()


# -- local servers -----------------------------------------------------------------------------
class Server:
    """A threaded http.server on 127.0.0.1 that records every request line it gets."""

    def __init__(
        self, routes: Callable[[BaseHTTPRequestHandler, Server], None], *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.hits: list[str] = []
        self.hosts: list[str | None] = []  # the Host header of each request
        self.routes = routes
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.hits.append(self.path)
                server.hosts.append(self.headers.get("Host"))
                with contextlib.suppress(OSError):  # the client hung up, as the fetcher should
                    server.routes(self, server)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def count(self, path: str) -> int:
        return sum(1 for hit in self.hits if hit.split("?")[0] == path)


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for key, value in {"Content-Length": str(len(body)), "Connection": "close", **headers}.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def recorder_routes(handler: BaseHTTPRequestHandler, server: Server) -> None:
    # An image: if a blocked request ever got through, the import would *add* it.
    send(handler, 200, png_bytes(99), {"Content-Type": "image/png"})


def make_hostile_routes(other_port: int) -> Callable[[BaseHTTPRequestHandler, Server], None]:
    bomb = gzip_bomb()
    redirects = {
        "/redirect/other": f"http://127.0.0.1:{other_port}/stolen",
        "/redirect/localhost": f"http://localhost:{other_port}/stolen",
        "/redirect/numeric": f"http://2130706433:{other_port}/stolen",
        "/redirect/mapped": f"http://[::ffff:127.0.0.1]:{other_port}/stolen",
        "/redirect/metadata": "http://169.254.169.254/latest/meta-data/",
        "/redirect/file": "file:///etc/passwd",
        "/redirect/loop": "/redirect/loop",
        "/redirect/ping": "/redirect/pong",
        "/redirect/pong": "/redirect/ping",
        "/redirect/fine": f"{FIXTURE}/ok.png?via=redirect",
    }

    def routes(handler: BaseHTTPRequestHandler, server: Server) -> None:
        path = handler.path.split("?")[0]
        wfile = handler.wfile
        if path == "/ok.png":
            send(handler, 200, png_bytes(1), {"Content-Type": "image/png"})
        elif path in redirects:
            send(handler, 302, b"", {"Location": redirects[path]})
        elif path.startswith("/hops/"):
            left = int(path.rsplit("/", 1)[1])  # redirects still to come
            target = f"/hops/{left - 1}" if left > 1 else "/ok.png"
            send(handler, 302, b"", {"Location": target})
        elif path == "/html":
            send(handler, 200, b"<html><body>not an image</body></html>", {"Content-Type": "text/html"})
        elif path == "/gzip":
            send(handler, 200, bomb, {"Content-Type": "image/png", "Content-Encoding": "gzip"})
        elif path == "/pixel-bomb.png":
            send(handler, 200, pixel_bomb_png(), {"Content-Type": "image/png"})
        elif path == "/missing":
            send(handler, 404, b"no", {"Content-Type": "text/plain"})
        elif path == "/huge":  # 100 MiB announced and sent, until the client hangs up
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            handler.send_header("Content-Length", str(100 * 1024 * 1024))
            handler.end_headers()
            block = b"\x00" * 65536
            for _ in range(1600):
                if server.stop.is_set():
                    return
                wfile.write(block)
        elif path == "/endless":  # no length, never ends: close-delimited
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            handler.send_header("Connection", "close")
            handler.end_headers()
            wfile.write(b"\x89PNG\r\n\x1a\n")
            while not server.stop.is_set():
                wfile.write(b"\x00" * 65536)
        elif path == "/endless-chunked":
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            while not server.stop.is_set():
                wfile.write(b"10000\r\n" + b"\x00" * 65536 + b"\r\n")
        elif path == "/slow":  # a byte a second
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            for byte in png_bytes(2)[:1000]:
                if server.stop.wait(1.0):
                    return
                wfile.write(bytes([byte]))
                wfile.flush()
        elif path == "/slow-headers":  # the status line, then a header byte a second
            wfile.write(b"HTTP/1.1 200 OK\r\n")
            wfile.flush()
            for byte in b"Content-Type: image/png\r\nContent-Length: 10\r\n\r\n":
                if server.stop.wait(1.0):
                    return
                wfile.write(bytes([byte]))
                wfile.flush()
        else:
            send(handler, 404, b"", {})

    return routes


@pytest.fixture
def recorder() -> Iterator[Server]:
    with Server(recorder_routes) as server:
        yield server


@pytest.fixture
def hostile(recorder: Server) -> Iterator[Server]:
    with Server(make_hostile_routes(recorder.port)) as server:
        yield server


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every socket.create_connection call of the process (the fetcher's only way out)."""
    calls: list[tuple[Any, ...]] = []
    original = socket.create_connection

    def spy(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        calls.append(tuple(address))
        return original(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return calls


def url_settings(settings: Settings, recorder: Server, hostile: Server, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        # The recorder's port is allowed on purpose: only the address rules stand in the way.
        "url_ports": [80, 443, recorder.port, hostile.port],
        "url_allow_test_hosts": {"fixture.test": f"127.0.0.1:{hostile.port}"},
        "url_timeout_s": 5.0,
        "url_deadline_s": 2.0,
        "url_job_deadline_s": 60.0,
    }
    values.update(overrides)
    return Settings.model_validate({**settings.model_dump(), **values})


@pytest.fixture
def settings(settings: Settings, recorder: Server, hostile: Server) -> Settings:
    return url_settings(settings, recorder, hostile)


def policy_of(settings: Settings) -> FetchPolicy:
    return FetchPolicy.from_settings(settings)


def make_collection(client: TestClient) -> None:
    response = client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    assert response.status_code == 201, response.text


def import_urls(client: TestClient, urls: list[str], *, timeout: float = 60.0) -> tuple[dict, list[dict]]:
    """Run a URL import to its end: the job and its report lines."""
    response = client.post(f"{API}/collections/shapes/imports", json={"urls": urls})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{API}/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {job['state']} after {timeout} s"
        time.sleep(0.05)
    assert job["state"] == "succeeded", job
    report = [json.loads(line) for line in client.get(f"{API}/jobs/{job_id}/report").text.splitlines()]
    assert len(report) == len(urls)
    return job, report


def outcome(line: dict) -> str:
    return line["code"] if line["status"] == "rejected" else line["status"]


# -- 37: blocked destinations ------------------------------------------------------------------
def blocked_urls(port: int) -> dict[str, str]:
    return {
        f"http://127.0.0.1:{port}/img.png": "blocked_destination",
        f"http://localhost:{port}/img.png": "blocked_destination",
        "http://localhost/": "blocked_destination",
        f"http://[::1]:{port}/": "blocked_destination",
        f"http://[::ffff:127.0.0.1]:{port}/": "blocked_destination",
        f"http://2130706433:{port}/": "blocked_destination",
        f"http://0x7f.1:{port}/": "blocked_destination",
        f"http://127.1:{port}/": "blocked_destination",
        f"http://0.0.0.0:{port}/": "blocked_destination",
        "http://169.254.169.254/latest/meta-data/": "blocked_destination",
        "http://10.0.0.1/": "blocked_destination",
        "http://100.64.0.1/": "blocked_destination",
        "http://192.168.1.1/": "blocked_destination",
        "http://[fd00::1]/": "blocked_destination",
        "http://[fe80::1]/": "blocked_destination",
        "http://example.test:22/": "blocked_destination",
        "file:///etc/passwd": "bad_scheme",
        "ftp://example.test/img.png": "bad_scheme",
        "gopher://example.test:70/_GET": "bad_scheme",
        "data:image/png;base64,iVBORw0KGgo=": "bad_scheme",
    }


@pytest.mark.timeout(60)
def test_r37_blocked_destinations_are_never_connected(
    client: TestClient, collection: str, recorder: Server, connects: list[tuple[Any, ...]]
) -> None:
    expected = blocked_urls(recorder.port)
    job, report = import_urls(client, list(expected))
    # Reports name URLs redacted (a data: URL shows its media type, not its payload).
    assert {line["item"]: outcome(line) for line in report} == {
        redact_url(url): why for url, why in expected.items()
    }
    assert (job["added"], job["failed"]) == (0, len(expected))
    assert recorder.hits == []
    assert connects == []  # not even a TCP handshake


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.255",
        "192.168.0.1", "169.254.169.254", "100.64.0.1", "100.127.255.255", "192.0.0.8", "198.18.0.1",
        "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "::", "::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::a00:1", "2002:7f00:1::1",
        "2001::1", "fc00::1", "fd12:3456::1", "fe80::1", "fec0::1", "ff02::1", "2001:db8::1",
    ],
)  # fmt: skip
def test_r37_address_table_blocks(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"])
def test_r37_address_table_lets_public_addresses_through(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.timeout(30)
def test_r37_a_name_with_any_private_address_is_blocked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, connects: list[tuple[Any, ...]]
) -> None:
    monkeypatch.setattr(fetcher, "resolve_host", lambda host, port, timeout_s: ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(CbirError) as caught:
        fetch("http://split-horizon.test/img.png", policy_of(settings))
    assert caught.value.code == "blocked_destination"
    assert connects == []


@pytest.mark.timeout(30)
def test_r37_connects_to_the_vetted_address_without_a_second_lookup(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name answers public once, loopback after; only the first answer is used."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])
    lookups: list[str] = []
    connected: list[tuple[Any, ...]] = []

    def resolve(host: str, port: int, timeout_s: float) -> list[str]:
        lookups.append(host)
        return next(answers)

    def refuse(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(tuple(address))
        raise ConnectionRefusedError("refused by the test")

    def no_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a second DNS lookup")

    monkeypatch.setattr(fetcher, "resolve_host", resolve)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_getaddrinfo)
    with pytest.raises(CbirError) as caught:
        fetch("http://rebind.test/img.png", policy_of(settings))
    assert caught.value.code == "remote_error"
    assert lookups == ["rebind.test"]
    assert connected == [("93.184.216.34", 80)]


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_r37_https_goes_to_the_vetted_address_with_the_host_name_for_sni_and_certificate(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=fixture.test", "-addext", "subjectAltName=DNS:fixture.test"]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject,
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, context: names.append(name)  # type: ignore[assignment,return-value]
    with Server(make_hostile_routes(1), tls=server_tls) as server:
        rule = {"fixture.test": f"127.0.0.1:{server.port}"}
        policy = FetchPolicy.from_settings(url_settings(settings, server, server, url_allow_test_hosts=rule))
        # Not trusted: the certificate is checked, so the fetch fails.
        with pytest.raises(CbirError) as caught:
            fetch("https://fixture.test/ok.png", policy)
        assert caught.value.code == "remote_error" and "CERTIFICATE_VERIFY_FAILED" in caught.value.detail
        # Trusted: it is checked against the host name, which also went out as SNI and Host.
        default_context = ssl.create_default_context
        monkeypatch.setattr(ssl, "create_default_context", lambda: default_context(cafile=str(cert)))
        fetched = fetch("https://fixture.test/ok.png", policy)
    assert fetched.data == png_bytes(1)
    assert names == ["fixture.test", "fixture.test"]
    assert server.hosts == ["fixture.test"]


# -- 38: redirects -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_r38_redirects_to_blocked_addresses_are_refused(
    client: TestClient,
    collection: str,
    recorder: Server,
    hostile: Server,
    connects: list[tuple[Any, ...]],
) -> None:
    expected = {
        f"{FIXTURE}/redirect/other": "redirect_blocked",
        f"{FIXTURE}/redirect/localhost": "redirect_blocked",
        f"{FIXTURE}/redirect/numeric": "redirect_blocked",
        f"{FIXTURE}/redirect/mapped": "redirect_blocked",
        f"{FIXTURE}/redirect/metadata": "redirect_blocked",
        f"{FIXTURE}/redirect/file": "redirect_blocked",
        f"{FIXTURE}/redirect/loop": "too_many_redirects",
        f"{FIXTURE}/redirect/ping": "too_many_redirects",
        f"{FIXTURE}/hops/4": "too_many_redirects",
        f"{FIXTURE}/hops/3": "added",  # three hops are followed
        f"{FIXTURE}/redirect/fine": "duplicate",  # a redirect within the allowed host: the same image
    }
    job, report = import_urls(client, list(expected))
    assert {line["item"]: outcome(line) for line in report} == expected
    assert recorder.hits == []
    assert set(connects) == {("127.0.0.1", hostile.port)}  # only the allowed fixture server
    # /hops/4 -> 3 -> 2 -> 1 and its fourth redirect (to /ok.png) is not followed; /hops/3 -> 2 -> 1
    # -> /ok.png is; /redirect/fine -> /ok.png?via=redirect.
    assert (hostile.count("/hops/4"), hostile.count("/hops/1"), hostile.count("/ok.png")) == (1, 2, 2)
    assert hostile.count("/redirect/loop") == 1  # the loop is seen, not run three times


# -- 40: hostile servers -----------------------------------------------------------------------
HOSTILE = {
    "/endless": "remote_too_large",
    "/endless-chunked": "remote_too_large",
    "/huge": "remote_too_large",
    "/slow": "timeout",
    "/slow-headers": "timeout",
    "/html": "not_an_image",
    "/gzip": "remote_too_large",
    "/missing": "remote_error",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", sorted(HOSTILE))
def test_r40_each_hostile_answer_is_cut_within_its_deadline(settings: Settings, path: str) -> None:
    policy = policy_of(settings)  # 2 s per URL, 2 MiB
    began = time.monotonic()
    with pytest.raises(CbirError) as caught:
        fetch(f"{FIXTURE}{path}", policy)
    elapsed = time.monotonic() - began
    assert caught.value.code == HOSTILE[path], caught.value.detail
    assert elapsed < policy.deadline_s + 3.0, f"{path} took {elapsed:.1f} s"


@pytest.mark.timeout(90)
def test_r40_hostile_server_items_are_reported_and_the_import_goes_on(
    client: TestClient, collection: str
) -> None:
    expected = {f"{FIXTURE}{path}": code for path, code in HOSTILE.items()}
    expected[f"{FIXTURE}/pixel-bomb.png"] = "image_too_large"
    expected[f"{FIXTURE}/ok.png"] = "added"
    began = time.monotonic()
    job, report = import_urls(client, list(expected))
    elapsed = time.monotonic() - began
    assert {line["item"]: outcome(line) for line in report} == expected
    assert (job["added"], job["failed"]) == (1, len(expected) - 1)
    # Two slow items at 2 s each, the rest at once: far from the 60 s an unbounded read would take.
    assert elapsed < 30, elapsed
    health = client.get(f"{API}/health")
    assert health.status_code == 200


@pytest.mark.timeout(60)
def test_r40_the_whole_import_keeps_its_overall_deadline(
    settings: Settings, recorder: Server, hostile: Server
) -> None:
    """Eight slow URLs at 2 s each would take 16 s; the import's own deadline of 3 s ends them."""
    short = url_settings(settings, recorder, hostile, url_job_deadline_s=3.0)
    urls = [f"{FIXTURE}/slow?n={n}" for n in range(8)]
    with TestClient(create_app(short), raise_server_exceptions=False) as client:
        make_collection(client)
        began = time.monotonic()
        job, report = import_urls(client, urls)
        elapsed = time.monotonic() - began
    assert [outcome(line) for line in report] == ["timeout"] * len(urls)
    assert elapsed < 3.0 + 5.0, elapsed
    assert hostile.count("/slow") <= 2  # the others were never requested


# -- 41: list caps, duplicates, malformed entries ----------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"urls": [f"{FIXTURE}/ok.png?n={n}" for n in range(6)]}, 413, "too_many_urls"),
        ({"urls": [f"{FIXTURE}/ok.png?n={n}" for n in range(1000)]}, 413, "too_many_urls"),
        ({"urls": []}, 422, "invalid_request"),
        ({"urls": "http://fixture.test/ok.png"}, 422, "invalid_request"),
        ({"urls": [1, 2]}, 422, "invalid_request"),
        ({"urls": [f"{FIXTURE}/ok.png"], "dataset": "mnist"}, 422, "invalid_request"),
    ],
)
def test_r41_url_lists_over_the_cap_or_malformed_are_refused(
    settings: Settings, recorder: Server, hostile: Server, body: dict, status: int, code: str
) -> None:
    capped = url_settings(settings, recorder, hostile, max_urls=5)
    with TestClient(create_app(capped), raise_server_exceptions=False) as client:
        make_collection(client)
        assert_problem(client.post(f"{API}/collections/shapes/imports", json=body), status, code)
        at_cap = {"urls": [f"{FIXTURE}/ok.png?n={n}" for n in range(5)]}
        assert client.post(f"{API}/collections/shapes/imports", json=at_cap).status_code == 202
    assert hostile.hits == [] or all(hit.startswith("/ok.png?n=") for hit in hostile.hits)


@pytest.mark.timeout(60)
def test_r41_duplicate_urls_are_fetched_once(client: TestClient, collection: str, hostile: Server) -> None:
    urls = [
        f"{FIXTURE}/ok.png",
        f"{FIXTURE}/ok.png",
        "HTTP://FIXTURE.TEST/ok.png",
        f"{FIXTURE}:80/ok.png#fragment",
        f"{FIXTURE}/ok.png?other=1",  # another URL (fetched), the same bytes: a stored duplicate
    ]
    job, report = import_urls(client, urls)
    assert [line["status"] for line in report] == ["added"] + ["duplicate"] * 4
    assert [line["code"] for line in report[1:4]] == ["duplicate_url"] * 3
    assert (job["added"], job["duplicates"], job["failed"]) == (1, 4, 0)
    assert hostile.count("/ok.png") == 2  # /ok.png once, /ok.png?other=1 once


MALFORMED = [
    "",
    "not a url",
    "www.example.com/cat.png",
    "/relative/cat.png",
    "http://",
    "http:///cat.png",
    "http:cat.png",
    "http://[::1/cat.png",
    "https://fixture.test:99999/cat.png",
    "http://fixture.test:port/cat.png",
    "http://exa mple.test/cat.png",
    "http://fixture.test/\r\nHost: evil",
    "http://user:secret@fixture.test/ok.png",
    "http://evil.test\\@fixture.test/ok.png",
    "http://a..b/cat.png",
    "http://-bad-.test/cat.png",
    "http://%31%32%37.0.0.1/cat.png",
    "http://" + "a" * 3000 + ".test/cat.png",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_r41_malformed_url_is_invalid(url: str) -> None:
    with pytest.raises(CbirError) as caught:
        parse_url(url)
    assert caught.value.code == "invalid_url"
    assert caught.value.status == 422


@pytest.mark.timeout(60)
def test_r41_malformed_entries_are_rejected_per_item(
    client: TestClient, collection: str, hostile: Server, connects: list[tuple[Any, ...]]
) -> None:
    job, report = import_urls(client, [*MALFORMED, f"{FIXTURE}/ok.png"])
    assert [outcome(line) for line in report] == ["invalid_url"] * len(MALFORMED) + ["added"]
    assert all(len(line["item"]) <= 300 for line in report)
    assert hostile.hits == ["/ok.png"]
    assert set(connects) == {("127.0.0.1", hostile.port)}


@pytest.mark.timeout(30)
def test_r41_url_import_can_be_turned_off(settings: Settings, recorder: Server, hostile: Server) -> None:
    off = url_settings(settings, recorder, hostile, url_import_enabled=False)
    with TestClient(create_app(off), raise_server_exceptions=False) as client:
        make_collection(client)
        response = client.post(f"{API}/collections/shapes/imports", json={"urls": [f"{FIXTURE}/ok.png"]})
        assert_problem(response, 403, "url_import_disabled")
    assert hostile.hits == []


def test_r41_a_resumed_url_job_skips_done_urls_without_fetching(
    settings: Settings, connects: list[tuple[Any, ...]]
) -> None:
    """The source rebuilds from the job row; members before the cursor are listed, never fetched."""
    source = UrlSource((f"{FIXTURE}/ok.png", "ftp://x/y", f"{FIXTURE}/ok.png", f"{FIXTURE}/html"))
    params = describe(source, data_dir=settings.data_dir)
    assert from_params(params, data_dir=settings.data_dir) == source
    members = list(members_of(source, settings))
    assert [m.reject[0] if m.reject else None for m in members] == [None, "bad_scheme", "duplicate_url", None]
    assert connects == []


@pytest.mark.timeout(60)
def test_r41_cli_imports_a_url_list(
    tmp_path: Path, database_url: str, recorder: Server, hostile: Server
) -> None:
    """`cbir import --urls FILE`: one URL a line, comments skipped, the same per-item checks."""
    listing = tmp_path / "urls.txt"
    listing.write_text(
        f"# images\n{FIXTURE}/ok.png\n\nftp://example.test/a.png\nhttp://127.0.0.1:{recorder.port}/x.png\n"
    )
    env = {
        "CBIR_DATA_DIR": str(tmp_path / "data"),
        "CBIR_DATABASE_URL": database_url,
        "CBIR_DEFAULT_EMBEDDER": "tiny",
        "CBIR_DEVICE": "cpu",
        "CBIR_IMPORT_PROCESSES": "0",
        "CBIR_URL_PORTS": json.dumps([80, recorder.port]),
        "CBIR_URL_ALLOW_TEST_HOSTS": json.dumps({"fixture.test": f"127.0.0.1:{hostile.port}"}),
    }
    threads = torch.get_num_threads()
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        created = runner.invoke(main, ["collections", "create", "shapes", "--embedder", "tiny"], env=env)
        assert created.exit_code == 0, created.output
        result = runner.invoke(main, ["import", str(listing), "--urls", "--collection", "shapes"], env=env)
    finally:
        get_settings.cache_clear()
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "1 added, 0 duplicates, 2 failed" in result.output
    assert hostile.hits == ["/ok.png"] and recorder.hits == []
