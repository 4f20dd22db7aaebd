"""Checkpoint files shared by the trained embedders: atomic writes, checked reads.

A checkpoint is one ``torch.save`` dict that describes itself (``format``, ``format_version``,
config, metrics, weights). Its SHA-256 is the identity an embedder version is derived from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch


def write_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> str:
    """Write ``payload`` atomically; return the file's SHA-256 hex.

    ``created_at`` and ``torch_version`` are added. The bytes go to a temporary name in the same
    folder, flushed and fsynced, then renamed over ``path``: a crash leaves the old file or the
    new one, never a torn one.
    """
    path = Path(path)
    payload = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        **payload,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def read_checkpoint(data: bytes, *, source: str, kind: str, fmt: str, version: int) -> dict[str, Any]:
    """Checkpoint bytes -> the payload dict (tensors on CPU); ``ValueError`` naming ``source``
    for a torn or foreign file, another format, or another format version."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a torn or foreign file
        raise ValueError(f"{source} is not a readable {kind} checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{source} is not a {kind} checkpoint (format {fmt!r})")
    if payload.get("format_version") != version:
        raise ValueError(
            f"{source} has {kind} checkpoint version {payload.get('format_version')!r}; "
            f"this build reads version {version}"
        )
    return payload


T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], *, what: str) -> T:
    """A config dataclass from its ``asdict`` form; keys it does not have are an error, not ignored."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
    return cls(**data)
