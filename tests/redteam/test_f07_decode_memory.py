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
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from app import faults
from app.main import create_app
from app.settings import Settings
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


@pytest.fixture
def slow_decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each budgeted decode holds its reservation 0.5 s longer (the ``decode`` fault seam), so that
    concurrent requests overlap for sure."""
    monkeypatch.setenv(faults.DELAY_ENV, "decode:0.5")
    faults.reset()
    yield
    monkeypatch.delenv(faults.DELAY_ENV)
    faults.reset()


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


def test_concurrent_large_searches_beyond_the_budget_get_a_quick_503_overloaded(
    slow_decodes: None, client_for: Callable[..., TestClient], settings: Settings
):
    client = client_for(small_budget(settings))
    client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    big = png16_rgba(SIDE, SIDE)

    def timed(_: int) -> tuple[float, int, object]:
        began = time.perf_counter()
        response = search(client, "shapes", big)
        return time.perf_counter() - began, response.status_code, response

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(timed, range(4)))
    served = [o for o in outcomes if o[1] == 200]
    refused = [o for o in outcomes if o[1] != 200]
    assert len(served) >= 1 and len(refused) >= 1, [o[1] for o in outcomes]
    for seconds, _, response in refused:
        assert_problem(response, 503, "overloaded")  # type: ignore[arg-type]
        assert response.headers["Retry-After"] == "1"  # type: ignore[attr-defined]
        assert seconds < 2.0  # waited decode_budget_wait_s (0.2 s), not for the other decodes
    budget = budget_of(client)
    assert budget.peak <= budget.capacity == 12 * MIB
    assert budget.reserved == 0


def test_concurrent_large_uploads_within_the_wait_are_served_one_after_another(
    slow_decodes: None, client_for: Callable[..., TestClient], settings: Settings
):
    client = client_for(small_budget(settings, decode_budget_wait_s=30.0))
    client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"})
    images = [png16_rgba(SIDE, SIDE, seed=i + 1) for i in range(3)]

    with ThreadPoolExecutor(3) as pool:
        codes = list(
            pool.map(lambda i: upload(client, "shapes", images[i], f"{i}.png").status_code, range(3))
        )
    assert codes == [201, 201, 201]
    budget = budget_of(client)
    # One decode's estimate at a time: two never fitted in the budget together.
    assert 0 < budget.peak <= budget.capacity < 2 * budget.peak
    assert budget.reserved == 0


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
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 60
    while (job := client.get(f"{API}/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert (job["state"], job["added"], job["failed"]) == ("succeeded", 4, 1), job
    budget = budget_of(client)
    assert 0 < budget.peak <= budget.capacity and budget.reserved == 0


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
