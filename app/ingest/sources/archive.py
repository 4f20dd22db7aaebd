"""Source kind ``archive``: an uploaded zip or tar, read member by member, never extracted.

Each member's label is its parent folder unless a manifest says otherwise: with a manifest
(uploaded beside the archive, or ``manifest.csv``/``manifest.jsonl`` inside it) only its rows are
imported, and rows naming no member are reported at the end. Zip members are read here; tars in
app/ingest/sources/tar_listing.py.
"""

from __future__ import annotations

import copy
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.core.errors import BadArchive, MemberRejected, TooManyMembers, UnsupportedArchive
from app.core.usertext import check_name
from app.ingest.sources.archive_common import (
    ARCHIVE_ERRORS,
    ARCHIVE_MAGIC,
    READ_CHUNK,
    archive_member,
    bomb,
    member_check,
    missing_rows,
    over_total,
    read_member,
    too_many,
)
from app.ingest.sources.base import Limits, Member, Reading, Source, skipped
from app.ingest.sources.manifests import (
    MANIFEST_NAMES,
    archive_manifest,
    parse_manifest,
    read_manifest,
    unreadable,
    zip_manifest,
)
from app.ingest.sources.tar_listing import head_entries, tar_count, tar_members


@dataclass(frozen=True)
class ArchiveSource(Source):
    path: Path  # the uploaded zip or tar in the data folder, deleted when the job ends
    filename: str
    manifest: Path | None = None  # an uploaded manifest beside it (else manifest.csv/.jsonl inside)
    manifest_name: str | None = None  # that manifest's name as the client sent it

    kind = "archive"

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "path": str(self.path.relative_to(data_dir)),
            "manifest": str(self.manifest.relative_to(data_dir)) if self.manifest else None,
            "manifest_name": self.manifest_name,
        }

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> ArchiveSource:
        manifest = params.get("manifest")
        return cls(
            data_dir / params["path"],
            params["filename"],
            data_dir / manifest if manifest else None,
            params.get("manifest_name"),
        )

    def members(self, reading: Reading) -> Iterator[Member]:
        """Members in archive order; a compressed tar is counted while it is read
        (``reading.on_total`` gets the count if one is found)."""
        limits = replace(reading.limits, member_bytes=min(reading.limits.member_bytes, reading.max_bytes))
        if zipfile.is_zipfile(self.path):
            yield from _zip_members(self, limits=limits)
        else:
            yield from tar_members(self, limits=limits, on_total=reading.on_total)

    def count(self, reading: Reading) -> int | None:
        if not zipfile.is_zipfile(self.path):
            return tar_count(self, limits=reading.limits)  # None for a compressed tar
        # members are read lazily: listing them reads the central directory only
        return sum(1 for _ in self.members(reading))

    def uploads(self) -> list[Path]:
        return [self.path] + ([self.manifest] if self.manifest else [])


def check_archive(
    path: Path,
    filename: str,
    *,
    manifest: Path | None = None,
    manifest_name: str | None = None,
    limits: Limits | None = None,
) -> ArchiveSource:
    """An uploaded zip or tar: 415 when it is neither, 422 when it is one but damaged (truncated),
    413 when it holds more than ``limits.members`` entries. Of a tar only the headers in its first
    bytes are read (app/ingest/sources/tar_listing.py): a tar.gz bomb is not inflated here."""
    limits = limits or Limits()
    check_name(filename, what="the archive's name")  # kept in the job's parameters and shown
    check_name(manifest_name, what="the manifest's name")
    kind = "zip" if zipfile.is_zipfile(path) else "tar" if _is_tar(path) else None
    if kind is None:
        with path.open("rb") as handle:
            head = handle.read(512)
        if head.startswith(ARCHIVE_MAGIC) or head[257:262] == b"ustar":
            raise BadArchive(f"{filename!r} is a damaged or truncated archive")
        raise UnsupportedArchive(f"{filename!r} is not a zip or tar archive (tar.gz and tar.bz2 are fine)")
    try:
        if kind == "zip":
            # The end record's count first: parsing a central directory costs ~600 B of memory per
            # entry, so a hostile one of millions of empty entries is refused before it is read.
            declared = _zip_declared_entries(path)
            if declared is not None and declared > limits.members:
                raise TooManyMembers(
                    f"{filename!r} declares {declared} members, more than {limits.members} members "
                    "(CBIR_MAX_ARCHIVE_MEMBERS)"
                )
            with zipfile.ZipFile(path) as archive:
                entries = len(archive.infolist())
        else:
            entries = head_entries(path, limits=limits)
    except ARCHIVE_ERRORS as exc:
        raise BadArchive(f"{filename!r} is a damaged or truncated {kind} archive: {str(exc)[:200]}") from None
    if entries > limits.members:
        raise TooManyMembers(
            f"{filename!r} holds more than {limits.members} members (CBIR_MAX_ARCHIVE_MEMBERS)"
        )
    source = ArchiveSource(path, filename, manifest, manifest_name)
    if manifest is not None:  # named as the client sent it, never by its temporary file
        name = manifest_name or "manifest"
        parse_manifest(read_manifest(manifest, name=name), name=name)
    return source


def _zip_declared_entries(path: Path) -> int | None:
    """The entry count a zip's end-of-central-directory record (zip64 included) declares."""
    try:
        with path.open("rb") as handle:
            end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]  # stdlib, stable since 2.x
    except (OSError, struct.error):
        return None
    return int(end[zipfile._ECD_ENTRIES_TOTAL]) if end else None  # type: ignore[attr-defined]


def _is_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*"):
            return True
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return False


def _zip_members(source: ArchiveSource, *, limits: Limits) -> Iterator[Member]:
    with zipfile.ZipFile(source.path) as archive:
        entries = archive.infolist()
        infos = [i for i in entries[: limits.members] if not i.is_dir() and not skipped(i.filename)]
        manifest = archive_manifest(
            uploaded=source.manifest,
            uploaded_name=source.manifest_name,
            read=lambda n: zip_manifest(archive, n),
            names=[i.filename for i in infos],
        )
        if unreadable(manifest):  # its one report line; the job fails with it
            yield from missing_rows(manifest)
            return
        # The total cap counts declared sizes, or what reads really inflated where that is more
        # (headers that lie, members rejected after reading): a zip of many lying members
        # stops costing CPU there too.
        declared, inflated = 0, [0]
        for info in infos:
            if manifest is not None and info.filename in MANIFEST_NAMES:
                continue
            mode = info.external_attr >> 16
            reject = member_check(
                info.filename,
                kind=stat.S_IFMT(mode) or stat.S_IFREG,
                size=info.file_size,
                compressed=info.compress_size,
                limits=limits,
            )
            if reject is None:
                declared += info.file_size
                if max(declared, inflated[0] + info.file_size) > limits.total_bytes:
                    reject = over_total(limits)
            yield from archive_member(
                info.filename,
                reject=reject,
                read=lambda info=info: _read_zip(archive, info, limits=limits, inflated=inflated),  # type: ignore[misc]
                manifest=manifest,
            )
        yield from missing_rows(manifest)
        if len(entries) > limits.members:
            yield too_many(source, limits)


def _read_zip(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, limits: Limits, inflated: list[int]
) -> bytes:
    """A zip member's bytes, inflated no further than the member cap whatever its header says:
    zipfile stops at the declared size, so it is handed a copy that declares more than we ever
    read (zipfile inflates ahead by up to 4 KiB, and reaching the declared end checks the CRC,
    which a cut-off read fails)."""
    bounded = copy.copy(info)
    bounded.file_size = limits.member_bytes + 1 + READ_CHUNK
    try:
        with archive.open(bounded) as handle:
            data = read_member(handle, limits=limits, inflated=inflated)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise MemberRejected("archive_member_unreadable", str(exc)[:300]) from None
    if bomb(len(data), info.compress_size, limits):
        raise MemberRejected(
            "compression_ratio", f"{len(data)} bytes from {info.compress_size}: over {limits.ratio:g} to 1"
        )
    if len(data) != info.file_size:
        raise MemberRejected(
            "archive_member_unreadable", f"inflates to {len(data)} bytes; its header says {info.file_size}"
        )
    return data
