"""Finding 11: a tar.gz of many large members of zeros is accepted at once and reported member by
member.

The request reads no more than the head of a compressed tar (the archive is counted, if at all, in
the job); the job inflates the stream once for the import (plus a bounded look for a manifest);
every member gets exactly one report line, those after the total cap ``archive_too_large`` with a
detail naming the cap, and the job's ``total`` is the number of lines.
"""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.settings import Settings
from app.main import create_app
from tests.api.helpers import job_report
from tests.api.test_imports import counts, start_archive_import, wait_for_job
from tests.conftest import encode

API = "/api/v1"
MiB = 1024 * 1024
MEMBERS, SIZE = 60, 3 * MiB  # 180 MiB of zeros in about 1 MB of tar.gz
CAPS = {
    "max_member_bytes": 4 * MiB,
    "max_upload_bytes": 4 * MiB,
    "max_total_uncompressed": 100 * MiB,
    "max_archive_members": 1000,
}


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


@pytest.fixture(scope="module")
def zeros_archive() -> tuple[bytes, int]:
    """A tar.gz: a PNG, then MEMBERS members of SIZE zero bytes; and the length of its tar stream."""
    pixels = np.random.default_rng(11).integers(0, 256, size=(20, 20), dtype=np.uint8)
    png = encode(Image.fromarray(pixels))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("cat/first.png")
        info.size = len(png)
        archive.addfile(info, io.BytesIO(png))
        for i in range(MEMBERS):
            info = tarfile.TarInfo(f"zeros/{i:03d}.raw")
            info.size = SIZE
            archive.addfile(info, Zeros(SIZE))
        stream = archive.offset
    return out.getvalue(), stream


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update=CAPS)), raise_server_exceptions=False) as client:
        assert (
            client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
        )
        yield client


@pytest.mark.timeout(120)
def test_tar_gz_of_zeros_is_accepted_at_once_and_every_member_gets_one_line(
    api: TestClient, zeros_archive: tuple[bytes, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, stream = zeros_archive
    furthest: dict[int, list] = {}
    original = tarfile.TarFile.next
    lock = threading.Lock()

    def spy(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        member = original(self)
        with lock:
            entry = furthest.setdefault(id(self), [threading.current_thread().name, 0])
            entry[1] = max(entry[1], self.offset)
        return member

    monkeypatch.setattr(tarfile.TarFile, "next", spy)
    response = start_archive_import(api, "shapes", data, name="zeros.tar.gz")
    assert response.status_code == 202, response.text
    with lock:
        in_request = sum(offset for name, offset in furthest.values() if not name.startswith("cbir-"))
    job = wait_for_job(api, response.json()["job_id"], timeout=100)
    assert job["state"] == "succeeded", job

    # The request read the head of the stream only: not a count of 180 MiB of zeros.
    # (Measured in bytes, not seconds: a shared machine makes wall-clock ratios flaky.)
    assert in_request < stream / 4, (in_request, stream)
    # The job inflated the stream once, plus a bounded look for a manifest at its head.
    inflated = sum(offset for _, offset in furthest.values())
    assert inflated < stream * 1.5, (inflated, stream)

    items = job_report(api, job)
    lines = api.get(f"{API}/jobs/{job['id']}/report").text.splitlines()
    assert len(lines) == len(items) == MEMBERS + 1 == job["total"] == job["done"]
    assert counts(job) == (MEMBERS + 1, 1, 0, MEMBERS)
    assert items["cat/first.png"] == ("added", None)
    codes = [items[f"zeros/{i:03d}.raw"][1] for i in range(MEMBERS)]
    # 3 MiB each: read (and found no image) until the 100 MiB total is passed by the 34th; it and
    # the members after it are rejected from their headers, unread.
    assert len(set(codes[:33])) == 1 and codes[0] != "archive_too_large", codes
    assert codes[33:] == ["archive_too_large"] * 27, codes
    details = {line for line in lines if "archive_too_large" in line}
    assert all("CBIR_MAX_TOTAL_UNCOMPRESSED" in line for line in details)
