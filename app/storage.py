"""Content-addressed image files: ``images/ab/cd/<sha256>.<ext>`` under the data folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ImageStore:
    """Stores each distinct image once, named by its SHA-256; collections may share a file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str, image_format: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.{EXTENSIONS[image_format]}"

    def put(self, data: bytes, *, sha256: str, image_format: str, fsync: bool = True) -> Path:
        path = self.path_for(sha256, image_format)
        if not path.exists():
            write_atomic(path, data, fsync=fsync)
        return path

    def read(self, sha256: str, image_format: str) -> bytes:
        return self.path_for(sha256, image_format).read_bytes()

    def delete(self, sha256: str, image_format: str) -> None:
        self.path_for(sha256, image_format).unlink(missing_ok=True)
