"""Pretrained CNN weights on disk: where a network's file comes from, finding it, downloading it.

Weights are never random: they come from ``CBIR_WEIGHTS_DIR``, the torch hub cache, a Python
package that ships them, or a download; ``WeightsMissing`` names the file and the folders when
none of those works.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from models.registry import WeightsMissing


@dataclass(frozen=True)
class Weights:
    """Where a network's pretrained weights come from and the input they expect."""

    file_name: str
    url: str | None
    mean: tuple[float, float, float]  # on the 0-1 scale
    std: tuple[float, float, float]
    crop: int
    resize: int
    interpolation: Image.Resampling = Image.Resampling.BILINEAR
    packaged: Callable[[], Path | None] | None = None  # a file shipped inside a Python package


_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


RESOLVE_TIMEOUT_S = 3.0  # a machine without DNS can otherwise block for minutes on the lookup
CONNECT_TIMEOUT_S = 10.0


def fetch(url: str, path: Path) -> None:
    """Download ``url`` to ``path`` atomically, failing fast when the host cannot be reached.

    torchvision file names carry the first hex digits of the file's SHA-256 (``resnet18-f37072fd``);
    a download that does not match them is discarded."""
    host = urllib.parse.urlsplit(url).hostname or ""
    resolved = threading.Event()

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            resolved.set()
        except OSError:
            pass

    # a daemon thread: a lookup that hangs must not hold up the process's exit either
    threading.Thread(target=resolve, name="cbir-resolve", daemon=True).start()
    if not resolved.wait(RESOLVE_TIMEOUT_S):
        raise OSError(f"cannot resolve {host} within {RESOLVE_TIMEOUT_S:g} s (offline?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response, tmp.open("wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        expected = re.search(r"-([0-9a-f]{6,})\.", path.name)
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise OSError(f"downloaded {path.name} does not match its SHA-256 prefix {expected.group(1)}")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def locate_weights(weights: Weights, *, weights_dir: Path | None, download: bool) -> Path:
    """The weights file: ``weights_dir``, the torch hub cache, a package, or a download, in that order."""
    candidates = [weights_dir / weights.file_name] if weights_dir is not None else []
    candidates.append(hub_checkpoints_dir() / weights.file_name)
    for path in candidates:
        if path.is_file():
            return path
    packaged = weights.packaged() if weights.packaged is not None else None
    if packaged is not None and packaged.is_file():
        return packaged
    problem = None
    if download and weights.url is not None:
        path = hub_checkpoints_dir() / weights.file_name
        try:
            fetch(weights.url, path)
            return path
        except Exception as exc:  # offline, proxy, disk, bad hash: all mean "not available here"
            problem = f"{type(exc).__name__}: {exc}"
    where = [str(p.parent) for p in candidates]
    how = (
        f"download it from {weights.url} and put it"
        if weights.url
        else "install the Python package that ships it, or put the file"
    )
    raise WeightsMissing(
        f"pretrained weights {weights.file_name} are not on this machine; {how} into "
        f"{' or '.join(where)} (CBIR_WEIGHTS_DIR sets the first)"
        + (f"; the download failed ({problem})" if problem else "")
    )
