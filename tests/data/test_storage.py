"""ImageStore: files named by content, written atomically, shared rather than duplicated."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from app.data.storage import ImageStore, sha256_hex, write_atomic

DATA = b"\x89PNG\r\n\x1a\n pretend pixels"
SHA = hashlib.sha256(DATA).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_sha256_hex_is_the_hex_digest():
    assert sha256_hex(DATA) == SHA and len(SHA) == 64


@pytest.mark.parametrize(
    ("image_format", "ext"), [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp")]
)
def test_path_is_fanned_out_by_hash_prefix(tmp_path: Path, image_format: str, ext: str):
    store = ImageStore(tmp_path)
    assert store.path_for(SHA, image_format) == tmp_path / SHA[:2] / f"{SHA}.{ext}"


def test_files_of_the_older_two_level_layout_are_still_found_and_deleted(tmp_path: Path):
    old = tmp_path / SHA[:2] / SHA[2:4] / f"{SHA}.png"
    old.parent.mkdir(parents=True)
    old.write_bytes(DATA)
    store = ImageStore(tmp_path)
    assert store.path_for(SHA, "PNG") == old and store.read(SHA, "PNG") == DATA
    assert store.put(DATA, sha256=SHA, image_format="PNG") and files_under(tmp_path) == [old]  # not twice
    store.delete(SHA, "PNG")
    assert files_under(tmp_path) == []


def test_put_writes_the_bytes_at_their_content_address(tmp_path: Path):
    store = ImageStore(tmp_path)
    path = store.put(DATA, sha256=SHA, image_format="PNG")
    assert path == store.path_for(SHA, "PNG")
    assert path.read_bytes() == DATA == store.read(SHA, "PNG")
    assert files_under(tmp_path) == [path]


def test_put_of_the_same_content_keeps_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = ImageStore(tmp_path)
    first = store.put(DATA, sha256=SHA, image_format="PNG")
    writes: list[Path] = []
    monkeypatch.setattr("app.data.storage.write_atomic", lambda path, data, **kw: writes.append(path))
    second = store.put(DATA, sha256=SHA, image_format="PNG")
    assert first == second and writes == []
    assert files_under(tmp_path) == [first]


def test_different_content_gets_different_files(tmp_path: Path):
    store = ImageStore(tmp_path)
    other = DATA + b"!"
    a = store.put(DATA, sha256=SHA, image_format="PNG")
    b = store.put(other, sha256=sha256_hex(other), image_format="PNG")
    assert a != b and a.read_bytes() == DATA and b.read_bytes() == other


def test_delete_removes_the_file_and_tolerates_a_missing_one(tmp_path: Path):
    store = ImageStore(tmp_path)
    path = store.put(DATA, sha256=SHA, image_format="PNG")
    store.delete(SHA, "PNG")
    assert not path.exists()
    store.delete(SHA, "PNG")  # already gone: no error


def test_write_atomic_creates_folders_and_leaves_no_temp_file(tmp_path: Path):
    target = tmp_path / "a" / "b" / "file.bin"
    write_atomic(target, DATA)
    assert target.read_bytes() == DATA
    assert files_under(tmp_path) == [target]


def test_write_atomic_replaces_existing_content(tmp_path: Path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    write_atomic(target, DATA)
    assert target.read_bytes() == DATA
    assert files_under(tmp_path) == [target]


def test_failed_write_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def no_space(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        write_atomic(target, DATA)
    assert target.read_bytes() == b"old"
    assert files_under(tmp_path) == [target]


def test_write_interrupted_before_the_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def crash(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "file.bin", DATA)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_write_atomic_fsyncs_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool):
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    write_atomic(tmp_path / "file.bin", DATA, fsync=fsync)
    assert bool(calls) is fsync
