"""The source kinds by the name a job stores, and the operations that take any source.

A job's row keeps ``describe(source)``: ``{"source": <kind>, ...}``; ``from_params`` finds the
class of that kind in ``KINDS`` and rebuilds the source from it after a restart.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from app.core.errors import CbirError
from app.ingest.sources.archive import ArchiveSource
from app.ingest.sources.base import Limits, Member, Reading, Source
from app.ingest.sources.dataset import DatasetSource
from app.ingest.sources.folder import FolderSource
from app.ingest.sources.holidays import HolidaysSource
from app.ingest.sources.idx import IdxSource
from app.ingest.sources.manifest import ManifestSource
from app.ingest.sources.urls import UrlSource

KINDS: dict[str, type[Source]] = {
    kind.kind: kind
    for kind in (
        ArchiveSource,
        FolderSource,
        HolidaysSource,
        IdxSource,
        ManifestSource,
        DatasetSource,
        UrlSource,
    )
}


def describe(source: Source, *, data_dir: Path) -> dict[str, Any]:
    """JSON parameters that rebuild the source after a restart (stored in the job row)."""
    return {"source": source.kind, **source.params(data_dir=data_dir)}


def from_params(params: dict[str, Any], *, data_dir: Path) -> Source:
    kind = params.get("source")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown source {kind!r}")
    return cls.from_params(params, data_dir=data_dir)


def iter_members(
    source: Source,
    *,
    max_bytes: int,
    datasets_dir: Path | None,
    data_dir: Path,
    limits: Limits | None = None,
) -> Iterator[Member]:
    """The source's members in their fixed order (a URL list needs ``members_of``)."""
    reading = Reading(
        max_bytes=max_bytes, data_dir=data_dir, datasets_dir=datasets_dir, limits=limits or Limits()
    )
    return source.members(reading)


def members_of(
    source: Source, settings: Any, *, on_total: Callable[[int], None] | None = None
) -> Iterator[Member]:
    """``iter_members`` with a service's settings (size caps, datasets and data folders, fetching).
    A compressed tar is counted while it is read: ``on_total`` gets the count if one is found."""
    return source.members(Reading.of(settings, on_total=on_total))


def count_members(
    source: Source, *, datasets_dir: Path | None, data_dir: Path, limits: Limits | None = None
) -> int | None:
    """How many members the source lists, without reading any (None when it cannot tell)."""
    reading = Reading(
        max_bytes=1 << 62, data_dir=data_dir, datasets_dir=datasets_dir, limits=limits or Limits()
    )
    try:
        return source.count(reading)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError, CbirError):
        return None


__all__ = [
    "KINDS",
    "ArchiveSource",
    "DatasetSource",
    "FolderSource",
    "HolidaysSource",
    "IdxSource",
    "Limits",
    "ManifestSource",
    "Member",
    "Source",
    "UrlSource",
    "count_members",
    "describe",
    "from_params",
    "iter_members",
    "members_of",
]
