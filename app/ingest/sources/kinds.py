"""Import sources as ordered streams of members: archives, server folders, manifests, IDX files,
Holidays-style folders and the built-in datasets.

A source lists its members in a fixed order, so that position ``n`` always names the same file:
an interrupted job resumes at its high-water mark by skipping the first ``n`` members without
reading them. A member that cannot be imported (a link, an unsafe name, a file over the size
limit) is listed with a reason code and never read.
"""

from __future__ import annotations

import copy
import io
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

from app.core.errors import (
    BadArchive,
    CbirError,
    FolderNotAllowed,
    InvalidRequest,
    MemberRejected,
    PathOutsideRoot,
    TooManyMembers,
    UnsupportedArchive,
)
from app.core.usertext import check_name
from app.ingest.sources.datasets import DATASETS, MNIST_FILES, load_mnist, read_idx
from app.ingest.sources.manifests import (
    MANIFEST_NAMES,
    ManifestRow,
    archive_manifest,
    parse_manifest,
    read_manifest,
    unreadable,
    zip_manifest,
)

# Re-exported: manifests were read in this module before app/ingest/sources/manifests.py.
from app.ingest.sources.manifests import MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES
from app.ingest.sources.manifests import MAX_META_CHARS as MAX_META_CHARS
from app.ingest.sources.manifests import MAX_META_KEYS as MAX_META_KEYS

SKIPPED_FOLDER = "__MACOSX"
GROUNDTRUTH_NAME = "groundtruth.json"
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
DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Limits:
    """What one import may read (CBIR_MAX_* settings); the defaults are the settings' defaults."""

    member_bytes: int = 20 * 1024 * 1024  # an archive member, inflated
    members: int = 1_000_000  # entries of an archive
    total_bytes: int = 8 * 1024 * 1024 * 1024  # all members of an archive, inflated
    ratio: float = 100.0  # inflated / compressed, per zip member of more than RATIO_FLOOR bytes
    folder_files: int = 1_000_000  # files of a server folder

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(
            member_bytes=min(settings.max_member_bytes, settings.max_upload_bytes),
            members=settings.max_archive_members,
            total_bytes=settings.max_total_uncompressed,
            ratio=settings.max_compression_ratio,
            folder_files=settings.max_folder_files,
        )


@dataclass
class Member:
    """One file of a source. ``read`` returns its bytes; a member with ``reject`` set is reported
    with that (code, detail) and never read."""

    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    read: Callable[[], bytes] | None = None
    reject: tuple[str, str] | None = None


# -- source descriptions ------------------------------------------------------------------
@dataclass(frozen=True)
class ArchiveSource:
    path: Path  # the uploaded zip or tar in the data folder, deleted when the job ends
    filename: str
    manifest: Path | None = None  # an uploaded manifest beside it (else manifest.csv/.jsonl inside)
    manifest_name: str | None = None  # that manifest's name as the client sent it


@dataclass(frozen=True)
class FolderSource:
    path: Path  # a resolved folder on this machine; subfolder names become labels


@dataclass(frozen=True)
class HolidaysSource:
    path: Path  # a folder holding groundtruth.json and the images (directly or in jpg/)


@dataclass(frozen=True)
class IdxSource:
    images: tuple[Path, ...]  # IDX image files (optionally .gz), each with its labels file or None
    labels: tuple[Path | None, ...]


@dataclass(frozen=True)
class ManifestSource:
    path: Path  # a CSV or JSON-lines file; its paths are relative to its folder
    roots: tuple[Path, ...] | None = None  # where its files may lie (None: anywhere, the CLI)


@dataclass(frozen=True)
class DatasetSource:
    dataset: str
    split: str  # "train", "test" or "all"


@dataclass(frozen=True)
class UrlSource:
    urls: tuple[str, ...]  # fetched one by one by app.ingest.sources.urls


Source = (
    ArchiveSource | FolderSource | HolidaysSource | IdxSource | ManifestSource | DatasetSource | UrlSource
)


def describe(source: Source, *, data_dir: Path) -> dict[str, Any]:
    """JSON parameters that rebuild the source after a restart (stored in the job row)."""
    if isinstance(source, ArchiveSource):
        return {
            "source": "archive",
            "filename": source.filename,
            "path": str(source.path.relative_to(data_dir)),
            "manifest": str(source.manifest.relative_to(data_dir)) if source.manifest else None,
            "manifest_name": source.manifest_name,
        }
    if isinstance(source, FolderSource):
        return {"source": "folder", "path": str(source.path)}
    if isinstance(source, HolidaysSource):
        return {"source": "holidays", "path": str(source.path)}
    if isinstance(source, IdxSource):
        return {
            "source": "idx",
            "images": [str(p) for p in source.images],
            "labels": [str(p) if p else None for p in source.labels],
        }
    if isinstance(source, ManifestSource):
        roots = [str(r) for r in source.roots] if source.roots is not None else None
        return {"source": "manifest", "path": str(source.path), "roots": roots}
    if isinstance(source, UrlSource):
        return {"source": "urls", "urls": list(source.urls)}
    return {"source": "dataset", "dataset": source.dataset, "split": source.split}


def from_params(params: dict[str, Any], *, data_dir: Path) -> Source:
    kind = params.get("source")
    if kind == "archive":
        manifest = params.get("manifest")
        return ArchiveSource(
            data_dir / params["path"],
            params["filename"],
            data_dir / manifest if manifest else None,
            params.get("manifest_name"),
        )
    if kind == "folder":
        return FolderSource(Path(params["path"]))
    if kind == "holidays":
        return HolidaysSource(Path(params["path"]))
    if kind == "idx":
        return IdxSource(
            tuple(Path(p) for p in params["images"]), tuple(Path(p) if p else None for p in params["labels"])
        )
    if kind == "manifest":
        roots = params.get("roots")
        return ManifestSource(
            Path(params["path"]), tuple(Path(r) for r in roots) if roots is not None else None
        )
    if kind == "dataset":
        return DatasetSource(params["dataset"], params["split"])
    if kind == "urls":
        return UrlSource(tuple(str(u) for u in params["urls"]))
    raise ValueError(f"unknown source {kind!r}")


# -- checks (before a job is queued) ------------------------------------------------------
def confine(path: Path, roots: list[Path] | None) -> Path:
    """``path`` resolved; with ``roots`` (requests over HTTP) it must lie inside one of them once
    links are resolved, so neither ``..`` nor a symlink can reach outside."""
    if roots is None:
        return path.resolve()
    if not roots:
        raise FolderNotAllowed("importing server files is off: set CBIR_IMPORT_ROOTS to allow some")
    if not path.is_absolute():
        raise InvalidRequest(f"give an absolute path under {', '.join(map(str, roots))}")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a link loop, a NUL byte
        resolved = None
    if resolved is None or not _within(resolved, roots):
        # the same answer whether it exists or not: the API does not probe the file system
        raise PathOutsideRoot(
            f"{str(path)[:200]!r} is not under the allowed roots ({', '.join(map(str, roots))})"
        )
    return resolved


def in_root(roots: dict[str, Path], name: str, path: str) -> Path:
    """``path`` (relative) inside the import root called ``name``, as an absolute path for
    ``check_folder``. Absolute paths and ``..`` are refused, also when %-encoded (a client that
    encoded twice), before the file system is asked anything."""
    if not roots:
        raise FolderNotAllowed("importing server files is off: set CBIR_IMPORT_ROOTS to allow some")
    root = roots.get(name)
    if root is None:
        raise InvalidRequest(f"no import root is called {name[:64]!r}; the roots are {sorted(roots)}")
    forms, form = [path], path
    for _ in range(3):  # %252e%252e is %2e%2e is ..
        form = unquote(form)
        forms.append(form)
    for form in forms:
        pure = PurePosixPath(form.replace("\\", "/"))
        if "\x00" in form or pure.is_absolute() or DRIVE.match(form) or ".." in pure.parts:
            raise PathOutsideRoot(f"{path[:200]!r} leaves the import root {name!r}")
    return root / path


def _within(path: Path, roots: tuple[Path, ...] | list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


IDX_IMAGES = re.compile(r"^(?P<stem>.*?)[-.]?images?[-.]idx3[-.]ubyte(\.gz)?$")


def find_idx(folder: Path) -> IdxSource | None:
    """The IDX image files of a folder (``*-images-idx3-ubyte[.gz]``, MNIST's names), each paired
    with its ``*-labels-idx1-ubyte[.gz]`` when present; None when there are none. Links that lead
    out of the folder are ignored, as in every folder import."""
    folder = folder.resolve()

    def usable(path: Path) -> bool:
        return path.is_file() and path.resolve().is_relative_to(folder)

    images: list[Path] = []
    labels: list[Path | None] = []
    seen: set[str] = set()
    for path in sorted(folder.iterdir()):
        match = IDX_IMAGES.match(path.name)
        if not match or not usable(path):
            continue
        plain = path.name.removesuffix(".gz")
        if plain in seen:  # both the .gz and the plain file: import one
            continue
        seen.add(plain)
        label_name = plain.replace("images", "labels").replace("idx3", "idx1")
        label = next((folder / n for n in (label_name, f"{label_name}.gz") if usable(folder / n)), None)
        images.append(path)
        labels.append(label)
    if not images:
        return None
    # MNIST's training split before its test split, whatever the names sort as.
    order = sorted(range(len(images)), key=lambda i: (not images[i].name.startswith("train"), images[i].name))
    return IdxSource(tuple(images[i] for i in order), tuple(labels[i] for i in order))


def check_folder(path: Path, *, roots: list[Path] | None = None, layout: str = "auto") -> Source:
    """A server folder to import. ``layout``: ``images`` (subfolder names are labels), ``idx``
    (MNIST-format IDX files), ``holidays`` (groundtruth.json beside the images) or ``auto``."""
    path = confine(path, roots)
    if not path.is_dir():
        raise InvalidRequest(f"{str(path)[:200]!r} is not a folder")
    if layout not in ("auto", "images", "idx", "holidays"):
        raise InvalidRequest(f"layout must be auto, images, idx or holidays, not {layout[:40]!r}")
    if layout in ("auto", "idx"):
        idx = find_idx(path)
        if idx is not None:
            return idx
        if layout == "idx":
            raise InvalidRequest(f"{str(path)[:200]!r} holds no *-images-idx3-ubyte[.gz] file")
    if layout in ("auto", "holidays") and (path / GROUNDTRUTH_NAME).is_file():
        _read_groundtruth(path)  # a bad file is a 422 now, not a failed job later
        return HolidaysSource(path)
    if layout == "holidays":
        raise InvalidRequest(f"{str(path)[:200]!r} has no {GROUNDTRUTH_NAME}")
    return FolderSource(path)


def check_manifest(path: Path, *, roots: list[Path] | None = None) -> ManifestSource:
    path = confine(path, roots)
    if not path.is_file():
        raise InvalidRequest(f"{str(path)[:200]!r} is not a file")
    parse_manifest(read_manifest(path), name=path.name)  # 422 now if unreadable
    return ManifestSource(path, tuple(roots) if roots is not None else None)


def check_dataset(dataset: str, split: str) -> DatasetSource:
    if dataset not in DATASETS:
        raise InvalidRequest(f"unknown dataset {dataset!r}; built-in datasets: {sorted(DATASETS)}")
    splits = (*DATASETS[dataset], "all")
    if split not in splits:
        raise InvalidRequest(f"dataset {dataset!r} has splits {list(splits)}, not {split!r}")
    return DatasetSource(dataset, split)


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError)  # a name flagged UTF-8 is not
ARCHIVE_ERRORS = (*_ZIP_ERRORS, tarfile.TarError, EOFError, OSError, zlib.error)


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
            from app.ingest.sources.tar_listing import head_entries

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


# -- members of each source -----------------------------------------------------------------
def label_from(name: str) -> dict[str, Any]:
    parts = PurePosixPath(name).parts
    return {"label": parts[-2]} if len(parts) >= 2 else {}


def _unsafe(name: str) -> bool:
    """A member name that could land outside a folder it were extracted to: absolute, a drive
    letter, or ``..`` between slashes or backslashes."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(DRIVE.match(name)) or ".." in parts


def skipped(name: str) -> bool:
    """macOS forks and hidden files or folders. Judged per path part, so "./cat/1.png" (tar of
    ".") is kept and "../evil.png" is left for the safety check to reject."""
    parts = PurePosixPath(name).parts  # "." parts are dropped here, ".." parts kept
    return not parts or parts[0] == SKIPPED_FOLDER or any(p.startswith(".") and p != ".." for p in parts)


def _too_large(size: int, limit: int) -> tuple[str, str] | None:
    return ("image_too_large", f"{size} bytes; the limit is {limit}") if size > limit else None


def iter_members(
    source: Source,
    *,
    max_bytes: int,
    datasets_dir: Path | None,
    data_dir: Path,
    limits: Limits | None = None,
) -> Iterator[Member]:
    """The source's members in their fixed order."""
    limits = limits or Limits()
    if isinstance(source, ArchiveSource):
        yield from _archive_members(
            source, limits=replace(limits, member_bytes=min(limits.member_bytes, max_bytes))
        )
    elif isinstance(source, FolderSource):
        yield from _folder_members(source.path, max_bytes=max_bytes, limit=limits.folder_files)
    elif isinstance(source, HolidaysSource):
        yield from _holidays_members(source, max_bytes=max_bytes, limit=limits.folder_files)
    elif isinstance(source, IdxSource):
        yield from _idx_members(source)
    elif isinstance(source, ManifestSource):
        yield from _manifest_members(source, max_bytes=max_bytes)
    elif isinstance(source, UrlSource):
        raise TypeError("URL members need the service's fetch settings: use members_of")
    else:
        yield from _dataset_members(source, datasets_dir=datasets_dir, data_dir=data_dir)


def members_of(
    source: Source, settings: Any, *, on_total: Callable[[int], None] | None = None
) -> Iterator[Member]:
    """``iter_members`` with a service's settings (size caps, datasets and data folders). A
    compressed tar is counted while it is read: ``on_total`` gets the count if one is found."""
    if isinstance(source, UrlSource):
        from app.ingest.sources.urls import url_members

        return url_members(source, settings)
    if isinstance(source, ArchiveSource) and not zipfile.is_zipfile(source.path):
        from app.ingest.sources.tar_listing import tar_members

        return tar_members(source, limits=Limits.of(settings), on_total=on_total)
    return iter_members(
        source,
        max_bytes=settings.max_upload_bytes,
        datasets_dir=settings.datasets_dir,
        data_dir=settings.data_dir,
        limits=Limits.of(settings),
    )


def count_members(
    source: Source, *, datasets_dir: Path | None, data_dir: Path, limits: Limits | None = None
) -> int | None:
    """How many members the source lists, without reading any (None when it cannot tell)."""
    try:
        if isinstance(source, ArchiveSource) and not zipfile.is_zipfile(source.path):
            from app.ingest.sources.tar_listing import tar_count  # None for a compressed tar

            return tar_count(source, limits=limits or Limits())
        if isinstance(source, ArchiveSource | FolderSource | HolidaysSource):
            # members are read lazily: listing them reads headers and directories only
            listed = iter_members(
                source, max_bytes=1 << 62, datasets_dir=datasets_dir, data_dir=data_dir, limits=limits
            )
            return sum(1 for _ in listed)
        if isinstance(source, IdxSource):
            return sum(_idx_count(path) for path in source.images)
        if isinstance(source, ManifestSource):
            return len(parse_manifest(read_manifest(source.path), name=source.path.name))
        if isinstance(source, UrlSource):
            return len(source.urls)
        return sum(len(_mnist(split, datasets_dir, data_dir)[1]) for split in _splits(source))
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError, CbirError):
        return None


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _archive_members(source: ArchiveSource, *, limits: Limits) -> Iterator[Member]:
    """Members in archive order (label = parent folder unless a manifest says otherwise); read one
    by one, never extracted. With a manifest only its rows are imported, and rows naming no
    member are reported at the end."""
    if zipfile.is_zipfile(source.path):
        yield from _zip_members(source, limits=limits)
    else:
        from app.ingest.sources.tar_listing import tar_members

        yield from tar_members(source, limits=limits)


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
            yield from _missing_rows(manifest)
            return
        # The total cap counts declared sizes, or what reads really inflated where that is more
        # (headers that lie, members rejected after reading): a zip of many lying members
        # stops costing CPU there too.
        declared, inflated = 0, [0]
        for info in infos:
            if manifest is not None and info.filename in MANIFEST_NAMES:
                continue
            mode = info.external_attr >> 16
            reject = _member_check(
                info.filename,
                kind=stat.S_IFMT(mode) or stat.S_IFREG,
                size=info.file_size,
                compressed=info.compress_size,
                limits=limits,
            )
            if reject is None:
                declared += info.file_size
                if max(declared, inflated[0] + info.file_size) > limits.total_bytes:
                    reject = _over_total(limits)
            yield from _archive_member(
                info.filename,
                reject=reject,
                read=lambda info=info: _read_zip(archive, info, limits=limits, inflated=inflated),  # type: ignore[misc]
                manifest=manifest,
            )
        yield from _missing_rows(manifest)
        if len(entries) > limits.members:
            yield _too_many(source, limits)


_KIND_NAMES = {
    stat.S_IFLNK: "a link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def _member_check(
    name: str, *, kind: int, size: int, limits: Limits, compressed: int | None = None
) -> tuple[str, str] | None:
    """Why an archive member is not read, judged from its header; None: read it."""
    if kind != stat.S_IFREG:
        what = _KIND_NAMES.get(kind, "not a regular file")
        return "unsupported_member_type", f"{what}: only regular files are imported"
    if _unsafe(name):
        return "unsafe_path", "the name leaves the archive (absolute, a drive letter or '..')"
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return "unsupported_format", "an archive inside the archive is not opened"
    if size > limits.member_bytes:
        return "member_too_large", f"{size} bytes inflated; the limit is {limits.member_bytes}"
    if compressed is not None and _bomb(size, compressed, limits):
        return "compression_ratio", f"{size} bytes from {compressed}: over {limits.ratio:g} to 1"
    return None


def _bomb(size: int, compressed: int, limits: Limits) -> bool:
    return size > RATIO_FLOOR and size > limits.ratio * max(compressed, 1)


def _over_total(limits: Limits) -> tuple[str, str]:
    return (
        "archive_too_large",
        f"the members add up to more than {limits.total_bytes} bytes inflated "
        "(CBIR_MAX_TOTAL_UNCOMPRESSED): this one and those after it are not read",
    )


def _too_many(source: ArchiveSource, limits: Limits) -> Member:
    return Member(
        f"{source.filename} (members after the first {limits.members})",
        reject=("too_many_members", f"the archive holds more than {limits.members} members"),
    )


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
            data = _read_member(handle, limits=limits, inflated=inflated)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise MemberRejected("archive_member_unreadable", str(exc)[:300]) from None
    if _bomb(len(data), info.compress_size, limits):
        raise MemberRejected(
            "compression_ratio", f"{len(data)} bytes from {info.compress_size}: over {limits.ratio:g} to 1"
        )
    if len(data) != info.file_size:
        raise MemberRejected(
            "archive_member_unreadable", f"inflates to {len(data)} bytes; its header says {info.file_size}"
        )
    return data


def _read_member(handle: Any, *, limits: Limits, inflated: list[int] | None = None) -> bytes:
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


def _archive_member(
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


def _missing_rows(manifest: dict[str, ManifestRow] | None) -> Iterator[Member]:
    for key, row in (manifest or {}).items():
        if row.error:
            yield Member(key.lstrip("\0"), reject=(row.code, row.error))
        else:
            yield Member(key, reject=("missing_member", "the manifest names a file the archive lacks"))


def _folder_files(folder: Path) -> Iterator[tuple[str, Path, OSError | None]]:
    """(relative name, path, None) of every entry below ``folder`` but folders, in name order (the
    order of sorted paths); hidden entries skipped; links, to folders too, listed and never
    followed. A subfolder that cannot be listed comes as (name, path, the error)."""
    stack = [("", iter(_listing(folder)))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = prefix + entry.name
        if skipped(name):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if not is_dir:
            yield name, Path(entry.path), None
            continue
        try:
            stack.append((f"{name}/", iter(_listing(Path(entry.path)))))
        except OSError as exc:
            yield name, Path(entry.path), exc


def _listing(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda e: e.name)


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)[:300]


def _file_member(
    name: str, path: Path, *, inside: tuple[Path, ...], metadata: dict[str, Any], max_bytes: int
) -> Member | None:
    """A server file as a member, judged before it is opened: a path outside ``inside``, or a link
    that leads there, is rejected and never followed, as is anything but a regular file (a FIFO
    would block a reader). A link to a folder gives None: its files are listed where they lie."""
    if not _within(Path(os.path.normpath(path)), inside):
        return Member(name, reject=("path_outside_root", "the path leaves the allowed folders"))
    try:
        linked = path.is_symlink()
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte
        return Member(name, reject=("file_unreadable", _why(exc)))
    if not _within(real, inside):
        return Member(
            name, reject=("symlink_outside_root", "a link out of the allowed folders is not followed")
        )
    try:
        info = real.stat()
    except (OSError, ValueError) as exc:  # gone, or a dangling link
        return Member(name, reject=("file_unreadable", _why(exc)))
    if stat.S_ISDIR(info.st_mode) and linked:
        return None
    if not stat.S_ISREG(info.st_mode):
        what = _KIND_NAMES.get(stat.S_IFMT(info.st_mode), "a folder")
        return Member(name, reject=("not_a_regular_file", f"{what}: only regular files are imported"))
    if reason := _too_large(info.st_size, max_bytes):
        return Member(name, reject=reason)
    return Member(name, metadata, read=lambda: _read_file(real, max_bytes=max_bytes))


def _read_file(path: Path, *, max_bytes: int) -> bytes:
    """A server file's bytes. It was judged when listed but may have changed since: opened
    without following a link or blocking on a FIFO, and judged again once open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MemberRejected("file_unreadable", "the file went away before it was read") from None
    except OSError as exc:
        raise MemberRejected("file_unreadable", _why(exc)) from None
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MemberRejected("not_a_regular_file", "no longer a regular file when opened")
        data = handle.read(max_bytes + 1)
    if reason := _too_large(len(data), max_bytes):
        raise MemberRejected(*reason)
    return data


def _capped(members: Iterable[Member | None], *, limit: int) -> Iterator[Member]:
    """``members`` (None ones dropped), the one after the first ``limit`` rejected as
    ``limit_reached`` and the rest not listed."""
    count = 0
    for member in members:
        if member is None:
            continue
        if count == limit:
            yield Member(
                member.name,
                reject=(
                    "limit_reached",
                    f"the folder holds more than {limit} files (CBIR_MAX_FOLDER_FILES): "
                    "this one and those after it are not imported",
                ),
            )
            return
        count += 1
        yield member


def _folder_entry(
    name: str, path: Path, problem: OSError | None, *, inside: Path, metadata: dict[str, Any], max_bytes: int
) -> Member | None:
    if problem is not None:
        return Member(name, reject=("file_unreadable", f"the folder cannot be listed: {_why(problem)}"))
    return _file_member(name, path, inside=(inside,), metadata=metadata, max_bytes=max_bytes)


def _folder_members(folder: Path, *, max_bytes: int, limit: int) -> Iterator[Member]:
    members = (
        _folder_entry(name, path, problem, inside=folder, metadata=label_from(name), max_bytes=max_bytes)
        for name, path, problem in _folder_files(folder)
    )
    yield from _capped(members, limit=limit)


def _read_groundtruth(folder: Path) -> dict[str, list[str]]:
    from app.learning.groundtruth import read_groundtruth

    path = (folder / GROUNDTRUTH_NAME).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise InvalidRequest(f"{GROUNDTRUTH_NAME} is a link out of the folder")
    return read_groundtruth(path)


def _holidays_files(folder: Path) -> Iterator[tuple[str, Path, OSError | None]]:
    images = folder / "jpg" if (folder / "jpg").is_dir() else folder
    for name, path, problem in _folder_files(images):
        if name != GROUNDTRUTH_NAME and not name.endswith((".dat", ".json", ".txt")):
            yield name, path, problem


def _holidays_members(source: HolidaysSource, *, max_bytes: int, limit: int) -> Iterator[Member]:
    """Holidays layout: each image's label is its query's name (``100000`` for 100000.jpg and
    its relevant 100001.jpg ...), with ``role`` query or relevant; other images get no label."""
    groups: dict[str, tuple[str, str]] = {}
    for query, relevant in _read_groundtruth(source.path).items():
        group = PurePosixPath(query).stem
        groups[PurePosixPath(query).name] = (group, "query")
        for name in relevant:
            groups.setdefault(PurePosixPath(name).name, (group, "relevant"))

    def metadata(name: str) -> dict[str, Any]:
        found = groups.get(PurePosixPath(name).name)
        return {"label": found[0], "role": found[1]} if found else {}

    members = (
        _folder_entry(name, path, problem, inside=source.path, metadata=metadata(name), max_bytes=max_bytes)
        for name, path, problem in _holidays_files(source.path)
    )
    yield from _capped(members, limit=limit)


def _manifest_members(source: ManifestSource, *, max_bytes: int) -> Iterator[Member]:
    folder = source.path.parent
    inside = source.roots if source.roots is not None else (Path("/"),)
    for number, row in enumerate(parse_manifest(read_manifest(source.path), name=source.path.name), 1):
        if row.path is None:
            yield Member(f"row {number}", reject=(row.code, row.error or "bad row"))
            continue
        path = Path(row.path)
        member = _file_member(
            row.path,
            path if path.is_absolute() else folder / path,
            inside=inside,
            metadata=row.metadata,
            max_bytes=max_bytes,
        )
        yield member or Member(row.path, reject=("not_a_regular_file", "a folder, not a file"))


def _idx_count(path: Path) -> int:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        header = handle.read(8)
    return int.from_bytes(header[4:8], "big")


def _idx_members(source: IdxSource) -> Iterator[Member]:
    """Each IDX image as a PNG named ``<file stem>-<index>.png`` with its label."""
    for image_path, label_path in zip(source.images, source.labels, strict=True):
        images = read_idx(image_path)
        labels = read_idx(label_path) if label_path is not None else None
        if images.ndim != 3 or (labels is not None and len(labels) != len(images)):
            raise ValueError(f"{image_path.name}: not an image file matching its labels")
        stem = IDX_IMAGES.match(image_path.name).group("stem") or "idx"  # type: ignore[union-attr]
        for i in range(len(images)):
            metadata: dict[str, Any] = {"file": image_path.name, "index": i}
            if labels is not None:
                metadata["label"] = str(int(labels[i]))
            yield Member(
                f"{stem}-{i:05d}.png", metadata, read=lambda i=i, images=images: png_bytes(images[i])
            )


def _splits(source: DatasetSource) -> tuple[str, ...]:
    return tuple(MNIST_FILES) if source.split == "all" else (source.split,)


def _mnist(split: str, datasets_dir: Path | None, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(split, datasets_dir=datasets_dir, download_dir=data_dir / "datasets")


def _dataset_members(source: DatasetSource, *, datasets_dir: Path | None, data_dir: Path) -> Iterator[Member]:
    for split in _splits(source):
        images, labels = _mnist(split, datasets_dir, data_dir)
        for i in range(len(images)):
            yield Member(
                f"{source.dataset}-{split}-{i:05d}.png",
                {"label": str(int(labels[i])), "dataset": source.dataset, "split": split, "index": i},
                read=lambda i=i, images=images: png_bytes(images[i]),
            )
