"""The index file: a checked header and a FAISS payload, written atomically, read back verified.

File format (version 1), little-endian::

    magic        8 bytes   b"CBIRVIX\\0"
    version      uint32    1
    header_len   uint32    length of the JSON header in bytes
    header_crc   uint32    zlib.crc32 of the JSON header
    header       JSON      {"dim", "factory", "metric", "meta", "ntotal", "id_checksum",
                            "payload_len", "payload_sha256"} and, optionally,
                           "tombstones" (ids deleted but still in the payload) and "hwm"
                           (the high-water mark: the largest id ever added)
    payload      bytes     faiss.serialize_index(index), exactly payload_len bytes

``ntotal`` and ``id_checksum`` describe the live ids (the payload's ids minus the tombstones).
A file is written to a temporary name beside it, flushed and renamed into place; the temporary
files of a writer that was killed mid-save are found by ``stale_temp_files``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.checksum import id_checksum

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "IndexCorrupt",
    "IndexFile",
    "read_index",
    "stale_temp_files",
    "write_index",
]

MAGIC = b"CBIRVIX\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIII")  # magic, version, header_len, header_crc
_MAX_HEADER_LEN = 16 * 1024 * 1024


class IndexCorrupt(Exception):
    """A file that cannot be read as a cbir vector index (wrong magic, torn, tampered)."""


@dataclass(frozen=True)
class IndexFile:
    """What a verified file holds: its header, the id-mapped FAISS index, and the live ids and
    tombstones (both (n,) int64, sorted ascending)."""

    header: dict[str, Any]
    index: Any
    ids: np.ndarray
    tombstones: np.ndarray

    @property
    def hwm(self) -> int:
        hwm = self.header.get("hwm", -1)
        return hwm if isinstance(hwm, int) else -1


def write_index(
    path: str | os.PathLike[str],
    *,
    header: dict[str, Any],
    payload: np.ndarray,
    on_stage: Callable[[str], None] | None = None,
) -> None:
    """Atomically write ``header`` (without the payload fields, which are added here) and
    ``payload`` (``faiss.serialize_index``'s uint8 array) to ``path``: the old file or the new one,
    never a torn one.

    The temporary file beside it is named ``.<name>.<pid>.<random>.tmp``, so that a later
    process can tell (``stale_temp_files``) which ones a dead writer left. ``on_stage`` is
    called with ``"half_written"`` and ``"replaced"`` (the crash tests' fault seam).
    """
    path = Path(path)
    header = {**header, "payload_len": int(payload.nbytes)}
    header["payload_sha256"] = hashlib.sha256(payload.data).hexdigest()
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes))

    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
            f.write(header_bytes)
            half = payload.nbytes // 2
            f.write(payload.data[:half])
            if on_stage is not None:
                f.flush()
                on_stage("half_written")
            f.write(payload.data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if on_stage is not None:
        on_stage("replaced")
    _fsync_dir(directory)


def read_index(path: str | os.PathLike[str]) -> IndexFile:
    """Read a file written by ``write_index``; ``IndexCorrupt`` if anything about it is off.

    A missing file raises ``FileNotFoundError`` (not corruption: there is nothing yet).
    """
    data = Path(path).read_bytes()
    where = f"{os.fspath(path)!r}"
    if len(data) < _PREFIX.size:
        raise IndexCorrupt(f"{where}: {len(data)} bytes is too short to be an index file")
    magic, version, header_len, header_crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise IndexCorrupt(f"{where}: not a cbir index file (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise IndexCorrupt(f"{where}: format version {version} is not supported (expected {FORMAT_VERSION})")
    header_end = _PREFIX.size + header_len
    if header_len > _MAX_HEADER_LEN or header_end > len(data):
        raise IndexCorrupt(f"{where}: truncated header ({header_len} bytes declared)")
    header_bytes = data[_PREFIX.size : header_end]
    if zlib.crc32(header_bytes) != header_crc:
        raise IndexCorrupt(f"{where}: header checksum mismatch")
    header = _parse_header(header_bytes, where=where)

    payload = memoryview(data)[header_end:]
    if len(payload) != header["payload_len"]:
        raise IndexCorrupt(
            f"{where}: payload is {len(payload)} bytes, header says {header['payload_len']}"
            " (truncated or padded)"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise IndexCorrupt(f"{where}: payload checksum mismatch")
    try:
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
    except Exception as exc:  # FAISS reports any read failure as RuntimeError
        raise IndexCorrupt(f"{where}: FAISS cannot read the payload: {exc}") from exc
    del data, payload
    ids, tombstones = _check_payload(index, header, where=where)
    return IndexFile(header=header, index=index, ids=ids, tombstones=tombstones)


def _check_payload(index: Any, header: dict[str, Any], *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(live ids, tombstones) of a deserialised payload, checked against its header."""
    if not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        kind = type(index).__name__
        raise IndexCorrupt(f"{where}: payload is {kind}, not an id-mapped index")
    if index.d != header["dim"]:
        raise IndexCorrupt(f"{where}: payload dimension {index.d} != header {header['dim']}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexCorrupt(f"{where}: payload metric is not inner product")
    stored = faiss.vector_to_array(index.id_map).astype(np.int64)
    tombstones = _tombstones(header.get("tombstones", []), where=where)
    if stored.size != index.ntotal:
        raise IndexCorrupt(f"{where}: id map is inconsistent")
    stored.sort()
    if stored.size > 1 and bool((stored[1:] == stored[:-1]).any()):
        raise IndexCorrupt(f"{where}: id map holds duplicate ids")
    if tombstones.size and not np.isin(tombstones, stored, assume_unique=True).all():
        raise IndexCorrupt(f"{where}: tombstones name ids the payload does not hold")
    ids = np.setdiff1d(stored, tombstones, assume_unique=True) if tombstones.size else stored
    if ids.size != header["ntotal"]:
        raise IndexCorrupt(f"{where}: payload holds {ids.size} live ids, header {header['ntotal']}")
    if id_checksum(ids) != header["id_checksum"]:
        raise IndexCorrupt(f"{where}: id checksum mismatch")
    return ids, tombstones


def _tombstones(value: Any, *, where: str) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise IndexCorrupt(f"{where}: header field 'tombstones' must be a list of ids")
    return np.unique(np.asarray(value, dtype=np.int64))


def _parse_header(header_bytes: bytes, *, where: str) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexCorrupt(f"{where}: header is not valid JSON: {exc}") from exc
    expected: dict[str, type | tuple[type, ...]] = {
        "dim": int,
        "factory": str,
        "metric": str,
        "meta": dict,
        "ntotal": int,
        "id_checksum": str,
        "payload_len": int,
        "payload_sha256": str,
    }
    if not isinstance(header, dict):
        raise IndexCorrupt(f"{where}: header is not a JSON object")
    for key, kind in expected.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise IndexCorrupt(f"{where}: header field {key!r} missing or of the wrong type")
    if header["metric"] != "inner_product":
        raise IndexCorrupt(f"{where}: unsupported metric {header['metric']!r}")
    return header


_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")  # .<name>.<pid>.<random>.tmp
_LOADED_AT = time.time()  # files this pid wrote before it are a previous process's (pid reuse)


def stale_temp_files(directory: str | os.PathLike[str], *, unnamed_age: float = 3600.0) -> list[Path]:
    """Temporary files of ``write_index`` in ``directory`` that no live writer will rename: their
    writer was killed mid-save. A name without a pid counts after ``unnamed_age`` s."""
    folder = Path(directory)
    stale = []
    for path in folder.glob(".*.tmp") if folder.is_dir() else []:
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue
        match = _TEMP_NAME.match(path.name)
        if match is None:
            if time.time() - mtime > unnamed_age:
                stale.append(path)
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            if mtime < _LOADED_AT:
                stale.append(path)
        elif not _alive(pid):
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; directories cannot be opened for fsync on Windows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
