"""What zip and tar uploads share: the checks judged from a member's header, the bounded read of
a member, and the matching of members to the rows of a manifest."""

from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from app.core.errors import MemberRejected
from app.ingest.sources.base import DRIVE, KIND_NAMES, Limits, Member, label_from
from app.ingest.sources.manifests import ManifestRow

# The compression-ratio check spares members under this size: a small flat-colour BMP is no bomb.
RATIO_FLOOR = 1024 * 1024
READ_CHUNK = 1024 * 1024
# Members named like archives are not opened (no recursion into nested archives).
ARCHIVE_SUFFIXES = (
    ".zip",
    ".tar",
    ".tgz",
    ".gz",
    ".bz2",
    ".tbz",
    ".tbz2",
    ".xz",
    ".txz",
    ".7z",
    ".rar",
    ".zst",
)
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf", b"Rar!")

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError)  # a name flagged UTF-8 is not
ARCHIVE_ERRORS = (*_ZIP_ERRORS, tarfile.TarError, EOFError, OSError, zlib.error)


class ArchiveFiles(Protocol):
    """An uploaded archive as its readers see it (app/ingest/sources/archive.py)."""

    @property
    def path(self) -> Path: ...

    @property
    def filename(self) -> str: ...

    @property
    def manifest(self) -> Path | None: ...

    @property
    def manifest_name(self) -> str | None: ...


def _unsafe(name: str) -> bool:
    """A member name that could land outside a folder it were extracted to: absolute, a drive
    letter, or ``..`` between slashes or backslashes."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(DRIVE.match(name)) or ".." in parts


def member_check(
    name: str, *, kind: int, size: int, limits: Limits, compressed: int | None = None
) -> tuple[str, str] | None:
    """Why an archive member is not read, judged from its header; None: read it."""
    if kind != stat.S_IFREG:
        what = KIND_NAMES.get(kind, "not a regular file")
        return "unsupported_member_type", f"{what}: only regular files are imported"
    if _unsafe(name):
        return "unsafe_path", "the name leaves the archive (absolute, a drive letter or '..')"
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return "unsupported_format", "an archive inside the archive is not opened"
    if size > limits.member_bytes:
        return "member_too_large", f"{size} bytes inflated; the limit is {limits.member_bytes}"
    if compressed is not None and bomb(size, compressed, limits):
        return "compression_ratio", f"{size} bytes from {compressed}: over {limits.ratio:g} to 1"
    return None


def bomb(size: int, compressed: int, limits: Limits) -> bool:
    return size > RATIO_FLOOR and size > limits.ratio * max(compressed, 1)


def over_total(limits: Limits) -> tuple[str, str]:
    return (
        "archive_too_large",
        f"the members add up to more than {limits.total_bytes} bytes inflated "
        "(CBIR_MAX_TOTAL_UNCOMPRESSED): this one and those after it are not read",
    )


def too_many(source: ArchiveFiles, limits: Limits) -> Member:
    return Member(
        f"{source.filename} (members after the first {limits.members})",
        reject=("too_many_members", f"the archive holds more than {limits.members} members"),
    )


def read_member(handle: Any, *, limits: Limits, inflated: list[int] | None = None) -> bytes:
    """Read in chunks, stopping one byte past the member cap (then rejected): what is counted is
    what was inflated (added to ``inflated[0]``). An archive inside is rejected here too, whatever
    its name."""
    chunks, size = [], 0
    while chunk := handle.read(min(READ_CHUNK, limits.member_bytes + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if inflated is not None:
            inflated[0] += len(chunk)
        if size > limits.member_bytes:
            raise MemberRejected(
                "member_too_large", f"inflates past {limits.member_bytes} bytes; not read further"
            )
    data = b"".join(chunks)
    if data.startswith(ARCHIVE_MAGIC) or data[257:262] == b"ustar":
        raise MemberRejected("unsupported_format", "an archive inside the archive is not opened")
    return data


def archive_member(
    name: str,
    *,
    reject: tuple[str, str] | None,
    read: Callable[[], bytes],
    manifest: dict[str, ManifestRow] | None,
) -> Iterator[Member]:
    if manifest is not None:
        row = manifest.pop(PurePosixPath(name).as_posix(), None)
        if row is None:
            return  # not in the manifest: not imported
        metadata = row.metadata
    else:
        metadata = label_from(name)
    yield Member(name, reject=reject) if reject else Member(name, metadata, read=read)


def missing_rows(manifest: dict[str, ManifestRow] | None) -> Iterator[Member]:
    for key, row in (manifest or {}).items():
        if row.error:
            yield Member(key.lstrip("\0"), reject=(row.code, row.error))
        else:
            yield Member(key, reject=("missing_member", "the manifest names a file the archive lacks"))
