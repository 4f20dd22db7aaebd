"""Tar archives as import members, read in one pass over the stream.

A compressed tar (gzip, bzip2, xz) can only be read from its start: reaching a header means
inflating everything before it. So the work is bounded by how far each reader goes:

- the request that uploads a tar reads the headers in the first HEAD_BYTES of the stream (a damage
  there is a 422 ``bad_archive``, more members than CBIR_MAX_ARCHIVE_MEMBERS there a 413) and
  answers at once: a tar.gz bomb is not counted in the request;
- the job looks for a ``manifest.csv``/``manifest.jsonl`` inside, counting the members as it goes,
  in the first max(HEAD_BYTES, SURVEY_RATIO x the archive's size) bytes: the whole of a real photo
  archive, a sliver of a bomb. A count found there is the job's ``total`` (with a manifest: one
  line per row); otherwise ``total`` stays unknown until the import has read the archive;
- the import reads the stream once. Members within the caps are read; the others are rejected from
  their header and skipped (``member_too_large``; ``archive_too_large`` after
  CBIR_MAX_TOTAL_UNCOMPRESSED); every member gets its line until the stream passes SCAN_FACTOR times
  the total cap, where one last line says the rest is not listed.

A plain tar is read by seeking, which costs nothing: the job reads all of its headers.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from app.ingest.sources.archive_common import (
    ARCHIVE_ERRORS,
    ArchiveFiles,
    archive_member,
    member_check,
    missing_rows,
    over_total,
    read_member,
    too_many,
)
from app.ingest.sources.base import Limits, Member, skipped
from app.ingest.sources.manifests import (
    MANIFEST_NAMES,
    MAX_MANIFEST_BYTES,
    ManifestRow,
    archive_manifest,
    unreadable,
)

HEAD_BYTES = 32 * 1024 * 1024
SURVEY_RATIO = 8
SCAN_FACTOR = 2
_TAR_KINDS = {
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.LNKTYPE: stat.S_IFLNK,  # a hard link: its target is another member, never followed
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def compressed(archive: tarfile.TarFile) -> bool:
    return isinstance(archive.fileobj, gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile)


class HeaderWalk:
    """The headers of an open tar in order, each with whether the files so far pass the total cap.
    ``end`` says why the walk stopped: ``end`` (the archive's end), ``budget`` (the next header
    lies past ``budget`` bytes of the stream), ``too_many`` (past ``limits.members`` entries) or
    ``unlisted`` (past the scan bound of a compressed tar). Errors of a damaged archive propagate."""

    def __init__(self, archive: tarfile.TarFile, *, limits: Limits, budget: int | None = None) -> None:
        self.archive, self.limits, self.budget = archive, limits, budget
        self.scan = SCAN_FACTOR * limits.total_bytes if compressed(archive) else None
        self.end, self.last, self.count = "end", "", 0

    def __iter__(self) -> Iterator[tuple[tarfile.TarInfo, bool]]:
        total = 0
        while True:
            offset = self.archive.offset  # where the next header starts: reaching it inflates to here
            if self.budget is not None and offset > self.budget:
                self.end = "budget"
                return
            if self.scan is not None and total > self.limits.total_bytes and offset > self.scan:
                self.end = "unlisted"
                return
            member = self.archive.next()
            if member is None:
                return
            self.archive.members.clear()  # type: ignore[attr-defined]  # else it keeps every header read
            if self.count == self.limits.members:
                self.end = "too_many"
                return
            self.count, self.last = self.count + 1, member.name
            total += member.size if member.isfile() else 0
            yield member, total > self.limits.total_bytes


def head_entries(path: Path, *, limits: Limits) -> int:
    """The entries in the first HEAD_BYTES of the tar at ``path`` (``limits.members`` + 1 when
    there are more): what a request checks. Raises the errors of a damaged archive."""
    with tarfile.open(path, "r:*") as archive:
        walk = HeaderWalk(archive, limits=limits, budget=HEAD_BYTES)
        for _ in walk:
            pass
    return walk.count + (walk.end == "too_many")


def _posix(name: str) -> str:
    return PurePosixPath(name).as_posix()


def _survey(source: ArchiveFiles, *, limits: Limits) -> tuple[tuple[str, bytes] | None, int | None, int]:
    """(the manifest inside: name and bytes, or None; the lines an import without a manifest gives,
    None when the survey did not reach the end; the survey's budget in bytes, None: all)."""
    with tarfile.open(source.path, "r:*") as archive:
        budget = max(HEAD_BYTES, SURVEY_RATIO * source.path.stat().st_size) if compressed(archive) else None
        walk = HeaderWalk(archive, limits=limits, budget=budget)
        lines = 0
        try:
            for member, _ in walk:
                if member.isdir() or skipped(member.name):
                    continue
                if member.isfile() and _posix(member.name) in MANIFEST_NAMES:
                    handle = archive.extractfile(member)
                    return (_posix(member.name), handle.read(MAX_MANIFEST_BYTES) if handle else b""), None, 0
                lines += 1
        except ARCHIVE_ERRORS:
            walk.end = "damaged"
    if walk.end == "budget":
        return None, None, budget or 0
    return None, lines + (walk.end != "end"), 0  # a last line: too many members, damage, unlisted


def _manifest(source: ArchiveFiles, found: tuple[str, bytes] | None) -> dict[str, ManifestRow] | None:
    return archive_manifest(
        uploaded=source.manifest,
        uploaded_name=source.manifest_name,
        read=lambda _: found[1] if found else b"",
        names=[found[0]] if found else [],
    )


def tar_count(source: ArchiveFiles, *, limits: Limits) -> int | None:
    """The lines an import of a plain tar gives; None for a compressed tar, which is counted (when
    it can be) by the import that reads it (``tar_members``' ``on_total``)."""
    with tarfile.open(source.path, "r:*") as archive:
        if compressed(archive):
            return None
    found, lines, _ = (None, None, 0) if source.manifest is not None else _survey(source, limits=limits)
    manifest = _manifest(source, found)
    return len(manifest) if manifest is not None else lines


def tar_members(
    source: ArchiveFiles, *, limits: Limits, on_total: Callable[[int], None] | None = None
) -> Iterator[Member]:
    """The members of a tar in archive order (see the module's docstring), never extracted; with a
    manifest (uploaded, or found inside by the survey) only its rows."""
    found, lines, budget = (None, None, 0) if source.manifest is not None else _survey(source, limits=limits)
    manifest = _manifest(source, found)
    if on_total is not None and (manifest is not None or lines is not None):
        on_total(len(manifest) if manifest is not None else lines or 0)
    if unreadable(manifest):  # its one report line, the stream never read; the job fails with it
        yield from missing_rows(manifest)
        return
    with tarfile.open(source.path, "r:*") as archive:
        walk = HeaderWalk(archive, limits=limits)
        try:
            for member, over in walk:
                if member.isdir() or skipped(member.name):
                    continue
                if _posix(member.name) in MANIFEST_NAMES and (manifest is not None or member.isfile()):
                    if manifest is None:  # the survey stopped before it: too late to apply it
                        yield _late_manifest(member.name, budget)
                    continue
                kind = stat.S_IFREG if member.isfile() else _TAR_KINDS.get(member.type, 0)
                reject = over_total(limits) if over else None
                reject = member_check(member.name, kind=kind, size=member.size, limits=limits) or reject

                def read(member: tarfile.TarInfo = member) -> bytes:
                    handle = archive.extractfile(member)
                    return read_member(handle, limits=limits) if handle is not None else b""

                yield from archive_member(member.name, reject=reject, read=read, manifest=manifest)
        except ARCHIVE_ERRORS as exc:
            # a tar.gz cut short: what came before stays imported, the tail is one rejected item
            where = f"after {walk.last!r}" if walk.last else "at its start"
            yield Member(
                f"{source.filename} ({where})",
                reject=("bad_archive", f"the archive is damaged or truncated {where}: {str(exc)[:200]}"),
            )
            return
    if walk.end == "too_many":
        yield too_many(source, limits)
    elif walk.end == "unlisted":
        yield Member(
            f"{source.filename} (members after {walk.last!r})",
            reject=(
                "archive_too_large",
                f"the archive inflates past {walk.scan} bytes ({SCAN_FACTOR} x CBIR_MAX_TOTAL_UNCOMPRESSED): "
                f"what follows {walk.last!r} is not read",
            ),
        )
    else:
        yield from missing_rows(manifest)


def _late_manifest(name: str, budget: int) -> Member:
    return Member(
        name,
        reject=(
            "manifest_too_late",
            f"a manifest inside a compressed tar is read when it lies in its first {budget} bytes "
            "(inflated): put it first, or upload it beside the archive in the 'manifest' field; the "
            "members were imported without it",
        ),
    )
