"""Finding 7: decode memory is budgeted in bytes, not only capped in pixels.

A 16-bit RGBA PNG of a few KB can declare a frame that takes many times its pixel count in bytes
to decode; several at once held gigabytes. Here the images are sized down to a megapixel and the
settings to a few MiB: an image over CBIR_MAX_DECODE_BYTES is a 413 although its pixel count is
within CBIR_MAX_PIXELS, decodes beyond CBIR_DECODE_MEMORY_BUDGET_BYTES wait or get 503
overloaded, never hold more than the budget at once, and give their reservation back on errors.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from app.catalog.collections import get_collection
from app.context import open_context
from app.core.settings import Settings
from app.imaging import decoding as decoding_service
from app.ingest import store as ingest_service
from app.learning.training import train_cdae
from app.main import create_app
from tests.api.helpers import assert_problem

API = "/api/v1"
MIB = 1024 * 1024
SIDE = 1024  # a megapixel: a quarter of the tests' CBIR_MAX_PIXELS


def png16_rgba(width: int, height: int, *, seed: int = 0, truncate: bool = False) -> bytes:
    """A 16-bit RGBA PNG, streamed through zlib one row at a time (a few KB for a megapixel of
    zeros; ``seed`` changes one pixel so that uploads are not duplicates). ``truncate`` cuts the
    compressed data in half: the header is whole, the decode fails."""
    compress = zlib.compressobj(9)
    row = bytes(1 + width * 8)  # filter byte, then 4 samples of 2 bytes per pixel
    first = bytearray(row)
    first[1:9] = seed.to_bytes(8, "big")
    parts = [compress.compress(bytes(first))]
    parts += [compress.compress(row) for _ in range(height - 1)]
    parts.append(compress.flush())
    idat = b"".join(parts)
    if truncate:
        idat = idat[: len(idat) // 2]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)  # 16 bits, RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def search(client: TestClient, collection: str, data: bytes):  # noqa: ANN201 - an httpx.Response
    return client.post(
        f"{API}/collections/{collection}/search",
        files={"file": ("q.png", data, "image/png")},
        params={"k": 1},
    )


def upload(client: TestClient, collection: str, data: bytes, name: str = "a.png"):  # noqa: ANN201
    return client.post(f"{API}/collections/{collection}/images", files={"file": (name, data, "image/png")})


def budget_of(client: TestClient):  # noqa: ANN201 - the app's DecodeBudget
    return client.app.state.context.decode_budget  # type: ignore[attr-defined]


def wait_for_job(client: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (job := client.get(f"{API}/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


class Gate:
    """Holds every request that reaches one of the delay points (``decode``: a search's decode,
    holding its reservation; ``store_batch``: an upload's write, holding its reservation) until
    ``open()``: the tests decide when reservations are given back, rather than sleep and hope."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.holding = 0

    def point(self, name: str) -> None:
        if name not in ("decode", "store_batch"):
            return
        with self._lock:
            self.holding += 1
        try:
            assert self._open.wait(60), "the test never opened the gate"
        finally:
            with self._lock:
                self.holding -= 1

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate()
    monkeypatch.setattr(decoding_service, "delay_point", held.point)
    monkeypatch.setattr(ingest_service, "delay_point", held.point)
    yield held
    held.open()  # a failed test must not leave a request held


def wait_until(condition: Callable[[], bool], *, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (a slow machine only makes
    it poll longer)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def small_budget(settings: Settings, **update: object) -> Settings:
    # About one 1024x1024 16-bit RGBA decode (9 MiB estimated) fits in 12 MiB, never two.
    return settings.model_copy(
        update={"decode_memory_budget_bytes": 12 * MIB, "decode_budget_wait_s": 0.2, **update}
    )


def test_image_over_the_decode_byte_cap_is_a_413_within_the_pixel_caps(
    client_for: Callable[..., TestClient], settings: Settings
):
    client = client_for(settings.model_copy(update={"max_decode_bytes": 4 * MIB}))
    client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    big = png16_rgba(SIDE, SIDE)
    assert settings.max_pixels >= SIDE * SIDE and len(big) < 64 * 1024

    body = assert_problem(search(client, "shapes", big), 413, "image_too_large")
    assert "bytes" in body["detail"] and str(4 * MIB) in body["detail"]
    assert_problem(upload(client, "shapes", big), 413, "image_too_large")
    assert client.get(f"{API}/collections/shapes").json()["image_count"] == 0
    # A normal image still works under the same cap.
    small = png16_rgba(64, 64)
    assert search(client, "shapes", small).status_code == 200
    assert upload(client, "shapes", small).status_code == 201


def test_a_large_search_while_the_budget_is_held_gets_a_quick_503_overloaded(
    gate: Gate, client_for: Callable[..., TestClient], settings: Settings
):
    client = client_for(small_budget(settings))
    client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    big = png16_rgba(SIDE, SIDE)
    budget = budget_of(client)

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(search, client, "shapes", big)
        wait_until(lambda: gate.holding == 1)  # decoded, holding its reservation
        # Answered while the first decode still holds the budget: it waited decode_budget_wait_s
        # (0.2 s), not for the other decode.
        refused = search(client, "shapes", big)
        assert_problem(refused, 503, "overloaded")
        assert refused.headers["Retry-After"] == "1"
        gate.open()
        assert first.result(timeout=60).status_code == 200
    assert budget.peak <= budget.capacity == 12 * MIB
    assert budget.reserved == 0 and budget.waiting == 0


def test_concurrent_large_uploads_within_the_wait_are_served_one_after_another(
    gate: Gate, client_for: Callable[..., TestClient], settings: Settings
):
    client = client_for(small_budget(settings, decode_budget_wait_s=60.0))
    client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    images = [png16_rgba(SIDE, SIDE, seed=i + 1) for i in range(3)]
    budget = budget_of(client)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(upload, client, "shapes", images[i], f"{i}.png") for i in range(3)]
        # One upload holds its reservation while it is written; the other two wait their turn.
        wait_until(lambda: gate.holding == 1 and budget.waiting == 2)
        gate.open()
        codes = [future.result(timeout=60).status_code for future in futures]
    assert codes == [201, 201, 201]
    # One decode's estimate at a time: two never fitted in the budget together.
    assert 0 < budget.peak <= budget.capacity < 2 * budget.peak
    assert budget.reserved == 0 and budget.waiting == 0


def test_failed_decodes_give_their_reservation_back(
    client_for: Callable[..., TestClient], settings: Settings
):
    client = client_for(small_budget(settings))
    client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    broken = png16_rgba(SIDE, SIDE, truncate=True)
    # More failures than the budget could hold leaked reservations of: a leak would turn the
    # last search into a 503.
    for _ in range(3):
        assert_problem(search(client, "shapes", broken), 422)
        assert_problem(upload(client, "shapes", broken), 422)
    budget = budget_of(client)
    assert budget.reserved == 0 and budget.peak > 0
    assert search(client, "shapes", png16_rgba(SIDE, SIDE)).status_code == 200
    assert upload(client, "shapes", png16_rgba(SIDE, SIDE, seed=7)).status_code == 201
    assert budget.reserved == 0


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "worker-processes"])
def test_archive_import_of_large_images_waits_for_the_budget_and_stores_them_all(
    processes: bool, client_for: Callable[..., TestClient], settings: Settings
):
    # Worker processes decode a chunk each; this process reserves room for its largest member.
    client = client_for(small_budget(settings, import_processes=processes, import_workers=1))
    client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(4):
            archive.writestr(f"big{i}.png", png16_rgba(SIDE, SIDE, seed=i + 1))
        archive.writestr("broken.png", png16_rgba(SIDE, SIDE, truncate=True))
    response = client.post(
        f"{API}/collections/shapes/imports", files={"file": ("big.zip", out.getvalue(), "application/zip")}
    )
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert (job["state"], job["added"], job["failed"]) == ("succeeded", 4, 1), job
    budget = budget_of(client)
    assert 0 < budget.peak <= budget.capacity and budget.reserved == 0


def stored_before_a_smaller_budget(settings: Settings, *, embedder: str) -> tuple[int, bytes]:
    """A collection "shapes" holding one 1024x1024 16-bit RGBA PNG (about 9 MiB to decode) and a
    small image, stored under the default settings; returns the large image's id and bytes."""
    big = png16_rgba(SIDE, SIDE, seed=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert (
            client.post(f"{API}/collections", json={"name": "shapes", "embedder": embedder}).status_code
            == 201
        )
        response = upload(client, "shapes", big, "big.png")
        assert response.status_code == 201, response.text
        assert upload(client, "shapes", png16_rgba(64, 64, seed=2), "small.png").status_code == 201
        return response.json()["id"], big


def test_a_stored_image_over_a_smaller_decode_cap_still_reembeds_and_renders_its_thumbnail(
    client_for: Callable[..., TestClient], settings: Settings
):
    # Stored on a large host, served on a small one: the cap (at most the budget, a quarter of the
    # memory by default) is now below the stored image's estimate.
    image_id, big = stored_before_a_smaller_budget(settings, embedder="tiny")
    client = client_for(settings.model_copy(update={"decode_memory_budget_bytes": 4 * MIB}))
    budget = budget_of(client)
    assert budget.capacity == 4 * MIB
    # New input is still capped...
    assert_problem(search(client, "shapes", big), 413, "image_too_large")
    assert budget.peak == 0
    # ...a stored file is not: it waits for the whole budget and decodes.
    thumb = client.get(f"{API}/images/{image_id}/thumbnail", params={"size": 64})
    assert thumb.status_code == 200, thumb.text
    assert thumb.headers["content-type"] == "image/webp"
    assert budget.peak == budget.capacity and budget.reserved == 0

    response = client.put(f"{API}/collections/shapes/embedder", json={"embedder": "pixels"})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert (job["state"], job["done"]) == ("succeeded", 2), job
    info = client.get(f"{API}/collections/shapes").json()
    assert info["embedder"] == "pixels" and info["image_count"] == info["index_size"] == 2
    assert budget.peak == budget.capacity and budget.reserved == 0


def test_training_decodes_stored_images_over_a_smaller_decode_cap(settings: Settings):
    stored_before_a_smaller_budget(settings, embedder="cdae")
    small = settings.model_copy(update={"decode_memory_budget_bytes": 4 * MIB})
    ctx = open_context(small)
    try:
        checkpoint = train_cdae(ctx, collection="shapes", epochs=1, preset="tutorial")
        info = get_collection(ctx, "shapes")
        assert info.embedder_version == checkpoint.version and info.index_size == 2
        assert ctx.decode_budget.peak == ctx.decode_budget.capacity and ctx.decode_budget.reserved == 0
    finally:
        ctx.close()


@pytest.fixture
def client_for() -> Iterator[Callable[..., TestClient]]:
    """``client_for(settings)``: a started TestClient on those settings, closed after the test."""
    opened: list[TestClient] = []

    def start(settings: Settings) -> TestClient:
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    yield start
    for client in opened:
        client.__exit__(None, None, None)
