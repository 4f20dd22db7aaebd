"""Reliability plan, section C: hostile archives (scenarios 24, 25, 27-31).

Archives are read member by member and never extracted; every bad member is one rejected line
of the job's report while the good ones are indexed. The plan's small caps (50 members, 2 MiB a
member, 20 MiB in all, ratio 100) are set by the ``api`` fixture below.
"""

from __future__ import annotations

import io
import os
import random
import struct
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.ingest.sources import kinds as sources
from app.ingest.sources.archive import check_archive
from app.main import create_app
from tests.api.helpers import assert_problem, job_report
from tests.api.test_imports import counts, make_tar, make_zip, start_archive_import, wait_for_job

API = "/api/v1"
MiB = 1024 * 1024
CAPS = {
    "max_archive_members": 50,
    "max_member_bytes": 2 * MiB,
    "max_total_uncompressed": 20 * MiB,
    "max_compression_ratio": 100.0,
}


@pytest.fixture
def capped(settings: Settings) -> Settings:
    return settings.model_copy(update=CAPS)


@pytest.fixture
def api(capped: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(capped), raise_server_exceptions=False) as client:
        assert (
            client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
        )
        yield client


@pytest.fixture(autouse=True)
def never_extracted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Any call of the extract functions of zipfile or tarfile fails the test."""
    calls: list[str] = []

    def spy(name: str) -> Callable[..., None]:
        def called(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} called")

        return called

    for owner, name in (
        (zipfile.ZipFile, "extract"),
        (zipfile.ZipFile, "extractall"),
        (tarfile.TarFile, "extract"),
        (tarfile.TarFile, "extractall"),
    ):
        monkeypatch.setattr(owner, name, spy(f"{owner.__name__}.{name}"))
    yield calls
    assert calls == []


@pytest.fixture
def good(make_png: Callable[..., bytes]) -> dict[str, bytes]:
    return {f"cat/{i}.png": make_png(100 + i) for i in range(3)}


def submit(client: TestClient, data: bytes, name: str = "images.zip") -> dict:
    response = start_archive_import(client, "shapes", data, name)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"])


def files_under(folder: Path, *, besides: Path) -> set[Path]:
    """Every file and link below ``folder`` except those in ``besides`` (the data folder)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here == besides or besides in here.parents:
            dirnames[:] = []
            continue
        found.update(here / name for name in (*filenames, *dirnames) if (here / name).is_symlink())
        found.update(here / name for name in filenames)
    return found


class RssPeak:
    """The process's resident memory, sampled every 5 ms while active: peak minus the start."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def zeros_member(archive: zipfile.ZipFile, name: str, size: int) -> None:
    """A deflated member of ``size`` zero bytes, written in chunks (never whole in memory)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=size > 1 << 31) as handle:
        for _ in range(size // MiB):
            handle.write(bytes(MiB))
        handle.write(bytes(size % MiB))


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes handed out by zipfile's member reader, call by call."""
    sizes: list[int] = []
    real = zipfile.ZipExtFile.read

    def read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        data = real(self, n)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return sizes


# -- 24 ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_r24_zip_bomb_member_is_rejected_and_the_others_indexed(
    api: TestClient, capped: Settings, good: dict[str, bytes], tmp_path: Path, inflated: list[int]
) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in good.items():
            archive.writestr(name, data)
        zeros_member(archive, "cat/bomb.png", 50 * MiB)
        zeros_member(archive, "cat/flat.png", 3 * MiB // 2)  # under the member cap, ratio ~1000
    data = out.getvalue()
    assert len(data) < 200 * 1024  # 51.5 MiB of zeros in well under 1 % of that
    before = files_under(tmp_path.parent, besides=capped.data_dir)
    with RssPeak() as rss:
        job = submit(api, data)
    assert job["state"] == "succeeded", job
    assert counts(job) == (5, 3, 0, 2)
    items = job_report(api, job)
    assert items["cat/bomb.png"] == ("rejected", "member_too_large")
    assert items["cat/flat.png"] == ("rejected", "compression_ratio")
    assert {items[name][0] for name in good} == {"added"}
    assert rss.growth < 100 * MiB, f"RSS grew {rss.growth / MiB:.0f} MiB"
    assert sum(inflated) < 1 * MiB  # only the three small PNGs were inflated
    assert files_under(tmp_path.parent, besides=capped.data_dir) == before


# -- 25 ---------------------------------------------------------------------------------------
def lie_about_size(data: bytes, name: str, size: int) -> bytes:
    """The zip with ``name``'s uncompressed size set to ``size`` in its central directory entry
    and local header (what a hand-made bomb does)."""
    raw = bytearray(data)
    encoded = name.encode()
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46 : central + 46 + len(encoded) + 0] != encoded or (
        struct.unpack_from("<H", raw, central + 28)[0] != len(encoded)
    ):  # the central directory entry of that name
        central = raw.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", raw, central + 24, size)
    local = struct.unpack_from("<I", raw, central + 42)[0]
    assert raw[local : local + 4] == b"PK\x03\x04"
    struct.pack_into("<I", raw, local + 22, size)
    return bytes(raw)


@pytest.mark.timeout(60)
def test_r25_lying_header_is_cut_off_at_the_cap_and_rejected(
    api: TestClient, good: dict[str, bytes], inflated: list[int]
) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in good.items():
            archive.writestr(name, data)
        zeros_member(archive, "cat/liar.png", 10 * MiB)
        archive.writestr(zipfile.ZipInfo("cat/short.png"), bytes(150), compress_type=zipfile.ZIP_DEFLATED)
    data = lie_about_size(lie_about_size(out.getvalue(), "cat/liar.png", 100), "cat/short.png", 100)
    with zipfile.ZipFile(io.BytesIO(data)) as check:
        assert check.getinfo("cat/liar.png").file_size == 100  # the lie is what zipfile believes
    job = submit(api, data)
    assert job["state"] == "succeeded", job
    assert counts(job) == (5, 3, 0, 2)
    items = job_report(api, job)
    assert items["cat/liar.png"] == ("rejected", "member_too_large")
    assert items["cat/short.png"] == ("rejected", "archive_member_unreadable")  # 150 bytes, not 100
    # The liar was inflated to one byte past the 2 MiB cap and no further, whatever it declared.
    assert sum(inflated) <= 2 * MiB + 1 + sum(len(d) for d in good.values()) + 150


@pytest.mark.timeout(60)
def test_r25_many_lying_members_stop_at_the_total_cap(
    api: TestClient, good: dict[str, bytes], inflated: list[int]
) -> None:
    """Thirty members that each declare 100 bytes and inflate 3 MiB: each read stops at the
    2 MiB cap, and once 20 MiB have been inflated the rest are rejected without being read."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in good.items():
            archive.writestr(name, data)
        for i in range(30):
            zeros_member(archive, f"liars/{i:02d}.png", 3 * MiB)
    data = out.getvalue()
    for i in range(30):
        data = lie_about_size(data, f"liars/{i:02d}.png", 100)
    job = submit(api, data)
    assert job["state"] == "succeeded" and counts(job) == (33, 3, 0, 30), job
    codes = [job_report(api, job)[f"liars/{i:02d}.png"][1] for i in range(30)]
    assert codes == ["member_too_large"] * 10 + ["archive_too_large"] * 20
    assert sum(inflated) <= 20 * MiB + 2 * MiB + sum(len(d) for d in good.values())


# -- 27 ---------------------------------------------------------------------------------------
TRAVERSALS = ["../../evil.png", "/abs/evil.png", "C:\\evil.png", "dir\\..\\..\\evil.png", "ok/../../evil.png"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_r27_traversal_names_are_rejected_and_nothing_lands_outside(
    api: TestClient,
    capped: Settings,
    good: dict[str, bytes],
    make_png: Callable[..., bytes],
    tmp_path: Path,
    kind: str,
) -> None:
    evil = {name: make_png(200 + i) for i, name in enumerate(TRAVERSALS)}
    members = {**good, **evil}
    data = make_zip(members) if kind == "zip" else make_tar(members)
    before = files_under(tmp_path.parent, besides=capped.data_dir)
    job = submit(api, data, name=f"images.{kind}")
    assert job["state"] == "succeeded", job
    assert counts(job) == (8, 3, 0, 5)
    items = job_report(api, job)
    assert {items[name] for name in TRAVERSALS} == {("rejected", "unsafe_path")}
    assert files_under(tmp_path.parent, besides=capped.data_dir) == before
    assert not Path("/abs").exists() and not Path("C:\\evil.png").exists() and not Path("evil.png").exists()
    assert api.get(f"{API}/collections/shapes").json()["image_count"] == 3


# -- 28 ---------------------------------------------------------------------------------------
def special_tar(good: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, kind, target in (
            ("cat/passwd.png", tarfile.SYMTYPE, "/etc/passwd"),
            ("cat/outside.png", tarfile.LNKTYPE, "../outside"),
            # PSF-2026-30's shape: a hard link to a deeper symlink that climbs out
            ("a/b/c/deep.png", tarfile.SYMTYPE, "../../../../../etc/passwd"),
            ("cat/to-deep.png", tarfile.LNKTYPE, "a/b/c/deep.png"),
            ("cat/null.png", tarfile.CHRTYPE, ""),
            ("cat/fifo.png", tarfile.FIFOTYPE, ""),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            if kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            archive.addfile(info)
    return out.getvalue()


SPECIALS = [
    "cat/passwd.png",
    "cat/outside.png",
    "a/b/c/deep.png",
    "cat/to-deep.png",
    "cat/null.png",
    "cat/fifo.png",
]


def test_r28_links_devices_and_fifos_in_a_tar_are_rejected_unextracted(
    api: TestClient, capped: Settings, good: dict[str, bytes], tmp_path: Path
) -> None:
    before = files_under(tmp_path.parent, besides=capped.data_dir)
    job = submit(api, special_tar(good), name="images.tar")
    assert job["state"] == "succeeded", job
    assert counts(job) == (9, 3, 0, 6)
    items = job_report(api, job)
    assert {items[name] for name in SPECIALS} == {("rejected", "unsupported_member_type")}
    assert {items[name][0] for name in good} == {"added"}
    assert files_under(tmp_path.parent, besides=capped.data_dir) == before


def test_r28_links_are_rejected_without_reading_them(
    capped: Settings, good: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the source level: a link member is never opened (extractfile would follow it)."""
    path = tmp_path / "special.tar"
    path.write_bytes(special_tar(good))
    opened: list[str] = []
    real = tarfile.TarFile.extractfile

    def extractfile(self: tarfile.TarFile, member: tarfile.TarInfo | str) -> object:
        opened.append(member if isinstance(member, str) else member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    source = check_archive(path, "special.tar", limits=sources.Limits.of(capped))
    members = []
    for member in sources.members_of(source, capped):  # each read where the listing stands
        if member.read is not None:
            member.read()
        members.append(member)
    assert {m.name: m.reject[0] for m in members if m.reject} == dict.fromkeys(
        SPECIALS, "unsupported_member_type"
    )
    assert sorted(opened) == sorted(good)


def test_r28_zip_symlink_member_is_rejected(api: TestClient, good: dict[str, bytes]) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in good.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("cat/passwd.png")
        link.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK, as `zip --symlinks` writes it
        archive.writestr(link, "/etc/passwd")
    job = submit(api, out.getvalue())
    assert counts(job) == (4, 3, 0, 1)
    assert job_report(api, job)["cat/passwd.png"] == ("rejected", "unsupported_member_type")


# -- 29 ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_r29_ten_thousand_members_are_a_413(api: TestClient, capped: Settings, kind: str) -> None:
    members = {f"m/{i:05d}.png": b"x" for i in range(10_000)}
    data = make_zip(members) if kind == "zip" else make_tar(members, mode="w:gz")
    began = time.monotonic()
    response = start_archive_import(api, "shapes", data, name=f"many.{kind}")
    assert time.monotonic() - began < 10
    assert "50 members" in assert_problem(response, 413, "too_many_members")["detail"]
    assert api.get(f"{API}/jobs").json()["jobs"] == []
    assert not list(capped.uploads_dir.glob("*")) and not list(capped.tmp_dir.glob("*"))


class Zeros(io.RawIOBase):
    """A file of ``size`` zero bytes, read in chunks."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zeros_tar_gz(path: Path, *, members: int, size: int, png: bytes) -> None:
    """A streamed tar.gz: one PNG, then ``members`` members of ``size`` zero bytes each."""
    with path.open("wb") as out, tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("cat/first.png")
        info.size = len(png)
        archive.addfile(info, io.BytesIO(png))
        for i in range(members):
            info = tarfile.TarInfo(f"zeros/{i:05d}.raw")
            info.size = size
            archive.addfile(info, Zeros(size))


def run_zeros(api: TestClient, path: Path) -> tuple[dict, dict[str, tuple[str, str | None]], float]:
    began = time.monotonic()
    response = start_archive_import(api, "shapes", path.read_bytes(), name="zeros.tar.gz")
    assert response.status_code == 202, response.text
    job = wait_for_job(api, response.json()["job_id"])
    return job, job_report(api, job), time.monotonic() - began


@pytest.mark.timeout(60)
def test_r29_tar_gz_of_zeros_stops_at_the_total_cap(
    api: TestClient, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    path = tmp_path / "zeros.tar.gz"
    zeros_tar_gz(path, members=40, size=MiB, png=make_png(1))  # 40 MiB against a 20 MiB cap
    job, items, seconds = run_zeros(api, path)
    assert job["state"] == "succeeded", job
    assert seconds < 10
    # the PNG, 19 members of 1 MiB within the cap, the 20th over it and the 20 after it, each on its
    # line (rejected unread); the stream ends just past twice the cap, where the listing stops and
    # one last line says so
    assert job["total"] == job["done"] == len(items) == 42
    assert items["cat/first.png"] == ("added", None)
    assert {items[f"zeros/{i:05d}.raw"] for i in range(19, 40)} == {("rejected", "archive_too_large")}
    assert items["zeros.tar.gz (members after 'zeros/00039.raw')"] == ("rejected", "archive_too_large")


@pytest.mark.timeout(120)
def test_r29_tar_gz_of_a_gibibyte_of_zeros_stops_at_the_total_cap(
    api: TestClient, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    path = tmp_path / "zeros.tar.gz"
    zeros_tar_gz(path, members=1024, size=MiB, png=make_png(1))  # 1 GiB of zeros
    assert path.stat().st_size < 20 * MiB
    job, items, seconds = run_zeros(api, path)
    assert seconds < 10, f"{seconds:.1f} s"
    # members are listed (rejected unread past the 20 MiB cap) until the stream passes 40 MiB
    assert job["state"] == "succeeded" and job["total"] == job["done"] == len(items) == 42, job
    assert items["zeros/00019.raw"] == ("rejected", "archive_too_large")
    assert items["zeros.tar.gz (members after 'zeros/00039.raw')"] == ("rejected", "archive_too_large")


# -- 30 ---------------------------------------------------------------------------------------
def test_r30_nested_archives_are_rejected_not_opened(
    api: TestClient, good: dict[str, bytes], make_png: Callable[..., bytes]
) -> None:
    inner = make_zip({"inner/secret.png": make_png(300)})
    inner_tar = make_tar({"inner/other.png": make_png(301)}, mode="w:gz")
    members = {**good, "cat/inner.zip": inner, "cat/inner.tar.gz": inner_tar, "cat/sneaky.png": inner}
    job = submit(api, make_zip(members))
    assert job["state"] == "succeeded", job
    assert counts(job) == (6, 3, 0, 3)
    items = job_report(api, job)
    for name in ("cat/inner.zip", "cat/inner.tar.gz", "cat/sneaky.png"):
        assert items[name] == ("rejected", "unsupported_format")
    assert not any(name.startswith("inner/") for name in items)
    names = {i["original_name"] for i in api.get(f"{API}/collections/shapes/images").json()}
    assert names == set(good)


# -- 31 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "zip-garbage"])
def test_r31_truncated_or_damaged_archive_is_422_bad_archive(
    api: TestClient, capped: Settings, good: dict[str, bytes], make_png: Callable[..., bytes], kind: str
) -> None:
    big = {**good, **{f"dog/{i}.png": make_png(400 + i, size=(64, 64)) for i in range(8)}}
    if kind == "zip":
        whole = make_zip(big)
        data = whole[: len(whole) // 2]
    elif kind == "tar":
        whole = make_tar(big)
        with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
            last = archive.getmembers()[-1]
        data = whole[: last.offset_data + 100]  # cut inside the last member's data
    elif kind == "tar.gz":
        whole = make_tar(big, mode="w:gz")
        data = whole[: len(whole) // 2]
    else:
        data = b"PK\x03\x04" + random.Random(31).randbytes(4096)
    response = start_archive_import(api, "shapes", data, name=f"cut.{kind}")
    assert_problem(response, 422, "bad_archive")
    assert api.get(f"{API}/jobs").json()["jobs"] == []
    assert list(capped.tmp_dir.iterdir()) == []


def test_r31_what_is_no_archive_at_all_stays_415(api: TestClient, make_png: Callable[..., bytes]) -> None:
    for data in (b"just text", make_png(0)):
        assert_problem(start_archive_import(api, "shapes", data), 415, "unsupported_archive")
