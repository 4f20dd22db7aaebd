"""Finding 10: metadata nested too deep or holding numbers too large for JSON and SQL is a 422
``bad_metadata`` (never a RecursionError or the int-string limit's 500), and a 500, if one ever
happens, leaves the keep-alive connection usable for the next request."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.helpers import PROBLEM, assert_problem
from tests.liveserver import LiveServer, run_in_sqlite_pass_only
from tests.redteam.user_text import API, assert_reads_work, image_count, manifest_import, seeded, upload


def nested_objects(levels: int) -> str:
    """A metadata object ``levels`` deep: 1 is ``{}``, 2 is ``{"a": {}}``."""
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)  # 10,000 levels: 60 KB


TOO_DEEP = {
    "objects 10000": nested_objects(10_000),
    "lists 10000": '{"a": ' + "[" * 10_000 + "]" * 10_000 + "}",
    "objects 33": nested_objects(33),
    "lists 40": '{"a": ' + "[" * 40 + "]" * 40 + "}",
}


@pytest.mark.parametrize("metadata", TOO_DEEP.values(), ids=TOO_DEEP.keys())
def test_metadata_nested_too_deep_is_refused_with_the_depth_limit(
    client: TestClient, collection: str, make_png: Callable[..., bytes], metadata: str
) -> None:
    ids = seeded(client, collection, make_png)
    body = assert_problem(upload(client, collection, make_png(50), metadata), 422, "bad_metadata")
    assert "32 levels" in body["detail"], body
    assert image_count(client, collection) == len(ids)
    assert_reads_work(client, collection, image_id=ids[0], query=make_png(0))


def test_metadata_32_levels_deep_is_stored(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    response = upload(client, collection, make_png(1), nested_objects(32))
    assert response.status_code == 201, response.text
    assert response.json()["image"]["metadata"] == json.loads(nested_objects(32))


TOO_LARGE = {
    "5000 digits": "1" * 5000,
    "2**63": str(2**63),
    "-(2**63)-1": str(-(2**63) - 1),
    "a long float": "1." + "0" * 400,
}


@pytest.mark.parametrize("number", TOO_LARGE.values(), ids=TOO_LARGE.keys())
def test_numbers_json_and_sql_cannot_hold_are_refused(
    client: TestClient, collection: str, make_png: Callable[..., bytes], number: str
) -> None:
    body = assert_problem(upload(client, collection, make_png(50), f'{{"n": {number}}}'), 422, "bad_metadata")
    assert "number" in body["detail"], body
    assert image_count(client, collection) == 0


def test_the_int64_range_is_stored_exactly(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    metadata = {"max": 2**63 - 1, "min": -(2**63), "pi": 3.141592653589793}
    response = upload(client, collection, make_png(1), json.dumps(metadata))
    assert response.status_code == 201, response.text
    assert response.json()["image"]["metadata"] == metadata


def test_manifest_rows_too_deep_or_with_huge_numbers_are_rejected_per_row(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    files = {f"shots/{i}.png": make_png(100 + i) for i in range(3)}
    job = manifest_import(
        client,
        collection,
        files=files,
        rows=[
            '{"path": "shots/0.png", "label": "5"}',
            '{"path": "shots/1.png", "x": ' + "[" * 10_000 + "]" * 10_000 + "}",
            '{"path": "shots/2.png", "n": ' + "9" * 5000 + "}",
        ],
    )
    assert job["state"] == "succeeded", job
    rejected = {item: code for item, (status, code) in job["report"].items() if status == "rejected"}
    assert rejected == {"row 2": "bad_metadata", "row 3": "bad_metadata"}
    assert job["added"] == 1


# -- a 500 and the keep-alive connection ---------------------------------------------------------
def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response (with Content-Length) read off ``sock``; b"" if the server closed it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def failing_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A real server whose GET /collections/{name}/labels fails with an unexpected error (a fault hook)."""
    run_in_sqlite_pass_only()
    env = {"CBIR_IMPORT_PROCESSES": "0", "CBIR_DEFAULT_EMBEDDER": "tiny", "CBIR_FAULT_FAIL_AT": "labels"}
    server = LiveServer(tmp_path / "data", tmp_path / "server.log", env=env)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.fault
def test_a_500_leaves_the_keep_alive_connection_usable(failing_server: LiveServer) -> None:
    peers: list[object] = []

    def note_connection(response: httpx.Response) -> None:
        peers.append(response.extensions["network_stream"].get_extra_info("client_addr"))

    with httpx.Client(
        base_url=f"{failing_server.url}{API}", timeout=60, event_hooks={"response": [note_connection]}
    ) as client:
        assert client.post("/collections", json={"name": "c", "embedder": "tiny"}).status_code == 201
        image_id = client.post("/collections/c/images", files={"file": ("a.png", png(1))}).json()["id"]
        assert_problem(client.get("/collections/c/labels"), 500, "internal_error")
        assert client.get("/health").status_code == 200
        assert client.get(f"/images/{image_id}").status_code == 200
    assert len(peers) == 5 and len(set(peers)) == 1, peers  # one connection throughout

    # A client that does not look whether the server closed the connection (curl, a browser's
    # pool under load): its next request on the same socket must get an answer, not a reset.
    host, port = failing_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {API}/collections/c/labels HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 500") and PROBLEM.encode() in first, first[:200]
        sock.sendall(f"GET {API}/health HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        second = read_response(sock)
        assert second.startswith(b"HTTP/1.1 200"), second[:200]
    log = failing_server.tail(50_000)
    assert "InjectedFault" in log and "Traceback" in log  # logged once, with its traceback
