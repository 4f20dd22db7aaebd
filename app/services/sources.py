"""Import sources as ordered streams of members: archives, server folders, manifests, IDX files,
Holidays-style folders and the built-in datasets.

A source lists its members in a fixed order, so that position ``n`` always names the same file:
an interrupted job resumes at its high-water mark by skipping the first ``n`` members without
reading them. A member that cannot be imported (a link, an unsafe name, a file over the size
limit) is listed with a reason code and never read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from app.datasets import DATASETS, MNIST_FILES, load_mnist, read_idx
from app.errors import CbirError, FolderNotAllowed, InvalidRequest, PayloadTooLarge, UnsupportedArchive

SKIPPED_FOLDER = "__MACOSX"
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
GROUNDTRUTH_NAME = "groundtruth.json"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# Metadata a manifest row may carry: keys and values are kept short.
MAX_META_KEYS, MAX_META_CHARS = 32, 512


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


Source = ArchiveSource | FolderSource | HolidaysSource | IdxSource | ManifestSource | DatasetSource


def describe(source: Source, *, data_dir: Path) -> dict[str, Any]:
    """JSON parameters that rebuild the source after a restart (stored in the job row)."""
    if isinstance(source, ArchiveSource):
        return {
            "source": "archive",
            "filename": source.filename,
            "path": str(source.path.relative_to(data_dir)),
            "manifest": str(source.manifest.relative_to(data_dir)) if source.manifest else None,
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
    return {"source": "dataset", "dataset": source.dataset, "split": source.split}


def from_params(params: dict[str, Any], *, data_dir: Path) -> Source:
    kind = params.get("source")
    if kind == "archive":
        manifest = params.get("manifest")
        return ArchiveSource(
            data_dir / params["path"], params["filename"], data_dir / manifest if manifest else None
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
    if resolved is None or not any(resolved.is_relative_to(root) for root in roots):
        # the same answer whether it exists or not: the API does not probe the file system
        raise FolderNotAllowed(
            f"{str(path)[:200]!r} is not under the allowed roots ({', '.join(map(str, roots))})"
        )
    return resolved


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


def check_archive(path: Path, filename: str, *, manifest: Path | None = None) -> ArchiveSource:
    if not (zipfile.is_zipfile(path) or _is_tar(path)):
        raise UnsupportedArchive(f"{filename!r} is not a zip or tar archive (tar.gz and tar.bz2 are fine)")
    source = ArchiveSource(path, filename, manifest)
    if manifest is not None:
        parse_manifest(read_manifest(manifest), name=manifest.name)
    return source


def _is_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*"):
            return True
    except (tarfile.TarError, OSError, EOFError):
        return False


# -- manifests ------------------------------------------------------------------------------
PATH_COLUMNS = ("path", "file", "filename", "member")


@dataclass(frozen=True)
class ManifestRow:
    path: str | None  # None: the row is unusable, ``error`` says why
    metadata: dict[str, Any]
    error: str | None = None


def read_manifest(path: Path) -> bytes:
    """A manifest file's bytes, never more than MAX_MANIFEST_BYTES read (413 when larger)."""
    with path.open("rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise PayloadTooLarge(f"the manifest {path.name!r} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def parse_manifest(data: bytes, *, name: str) -> list[ManifestRow]:
    """CSV with a header (a ``path`` column, optional ``label``, other columns as metadata) or JSON
    lines (``{"path": ..., "label": ..., "metadata": {...}}``, other keys as metadata).

    A file that cannot be read at all raises InvalidRequest; a bad row becomes a row with an error.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest(f"the manifest {name!r} is not UTF-8 text") from None
    stripped = text.lstrip()
    if name.endswith(".jsonl") or stripped.startswith("{"):
        return [_jsonl_row(line, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        return _csv_rows(text, name=name)
    except csv.Error as exc:
        raise InvalidRequest(f"the manifest {name!r} is not readable CSV: {exc}") from None


def _csv_rows(text: str, *, name: str) -> list[ManifestRow]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise InvalidRequest(
            f"the manifest {name!r} needs a header with one of the columns {', '.join(PATH_COLUMNS)}"
        )
    rows = []
    for record in reader:
        values = {(k or "").strip().lower(): v for k, v in record.items() if k is not None}
        if None in record:
            rows.append(ManifestRow(None, {}, "the row has more fields than the header"))
            continue
        path = (values.pop(path_column) or "").strip()
        rows.append(_row(path, {k: v for k, v in values.items() if k and v not in (None, "")}))
    return rows


def _jsonl_row(line: str, number: int) -> ManifestRow:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return ManifestRow(None, {}, f"line {number} is not JSON: {exc.msg}")
    except (RecursionError, ValueError):  # nested too deep, a number too long
        return ManifestRow(None, {}, f"line {number} is not JSON this service reads")
    if not isinstance(value, dict):
        return ManifestRow(None, {}, f"line {number} is not a JSON object")
    path = next((value.pop(c) for c in PATH_COLUMNS if c in value), None)
    if not isinstance(path, str):
        return ManifestRow(None, {}, f"line {number} has no string 'path'")
    nested = value.pop("metadata", None)
    metadata = dict(nested) if isinstance(nested, dict) else {}
    metadata.update(value)
    return _row(path, metadata)


def _row(path: str, metadata: dict[str, Any]) -> ManifestRow:
    if not path:
        return ManifestRow(None, {}, "the row has an empty path")
    clean: dict[str, Any] = {}
    for key, value in list(metadata.items())[:MAX_META_KEYS]:
        if isinstance(value, float) and not math.isfinite(value):
            return ManifestRow(None, {}, f"metadata {str(key)[:64]!r} is not a finite number")
        if (isinstance(value, str) and "\x00" in value) or "\x00" in str(key):
            return ManifestRow(None, {}, "metadata holds a NUL character")
        if isinstance(value, str | int | float | bool) or value is None:
            clean[str(key)[:64]] = value[:MAX_META_CHARS] if isinstance(value, str) else value
    if "label" in clean and clean["label"] is not None:
        clean["label"] = str(clean["label"])
    return ManifestRow(path, clean)


# -- members of each source -----------------------------------------------------------------
def label_from(name: str) -> dict[str, Any]:
    parts = PurePosixPath(name).parts
    return {"label": parts[-2]} if len(parts) >= 2 else {}


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts


def skipped(name: str) -> bool:
    """macOS forks and hidden files or folders. Judged per path part, so "./cat/1.png" (tar of
    ".") is kept and "../evil.png" is left for the safety check to reject."""
    parts = PurePosixPath(name).parts  # "." parts are dropped here, ".." parts kept
    return not parts or parts[0] == SKIPPED_FOLDER or any(p.startswith(".") and p != ".." for p in parts)


def _too_large(size: int, limit: int) -> tuple[str, str] | None:
    return ("image_too_large", f"{size} bytes; the limit is {limit}") if size > limit else None


def iter_members(
    source: Source, *, max_bytes: int, datasets_dir: Path | None, data_dir: Path
) -> Iterator[Member]:
    """The source's members in their fixed order."""
    if isinstance(source, ArchiveSource):
        yield from _archive_members(source, max_bytes=max_bytes)
    elif isinstance(source, FolderSource):
        yield from _folder_members(source.path, max_bytes=max_bytes)
    elif isinstance(source, HolidaysSource):
        yield from _holidays_members(source, max_bytes=max_bytes)
    elif isinstance(source, IdxSource):
        yield from _idx_members(source)
    elif isinstance(source, ManifestSource):
        yield from _manifest_members(source, max_bytes=max_bytes)
    else:
        yield from _dataset_members(source, datasets_dir=datasets_dir, data_dir=data_dir)


def members_of(source: Source, settings: Any) -> Iterator[Member]:
    """``iter_members`` with a service's settings (size cap, datasets and data folders)."""
    return iter_members(
        source,
        max_bytes=settings.max_upload_bytes,
        datasets_dir=settings.datasets_dir,
        data_dir=settings.data_dir,
    )


def count_members(source: Source, *, datasets_dir: Path | None, data_dir: Path) -> int | None:
    """How many members the source lists, without reading any (None when it cannot tell)."""
    try:
        if isinstance(source, ArchiveSource):
            return sum(1 for _ in _archive_members(source, max_bytes=1 << 62, listing=True))
        if isinstance(source, FolderSource):
            return sum(1 for _ in _folder_files(source.path))
        if isinstance(source, HolidaysSource):
            return sum(1 for _ in _holidays_files(source.path))
        if isinstance(source, IdxSource):
            return sum(_idx_count(path) for path in source.images)
        if isinstance(source, ManifestSource):
            return len(parse_manifest(read_manifest(source.path), name=source.path.name))
        return sum(len(_mnist(split, datasets_dir, data_dir)[1]) for split in _splits(source))
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError, CbirError):
        return None


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _archive_members(source: ArchiveSource, *, max_bytes: int, listing: bool = False) -> Iterator[Member]:
    """Regular-file members in archive order (label = parent folder unless a manifest says
    otherwise); read one by one, never extracted. With a manifest only its rows are imported,
    and rows naming no member are reported at the end."""
    if zipfile.is_zipfile(source.path):
        with zipfile.ZipFile(source.path) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir() and not skipped(i.filename)]
            manifest = _archive_manifest(
                source, lambda n: _zip_manifest(archive, n), [i.filename for i in infos]
            )
            for info in infos:
                if manifest is not None and info.filename in MANIFEST_NAMES:
                    continue
                yield from _archive_member(
                    info.filename,
                    size=info.file_size,
                    regular=True,
                    read=lambda info=info: archive.read(info),  # type: ignore[misc]
                    manifest=manifest,
                    max_bytes=max_bytes,
                )
            yield from _missing_rows(manifest)
        return
    names: list[str] | None = None
    manifest_data: bytes | None = None
    if source.manifest is None:
        # A manifest inside a tar may come anywhere: find it with one pass over the headers.
        with tarfile.open(source.path, "r:*") as archive:
            for member in archive:
                if member.isfile() and PurePosixPath(member.name).as_posix() in MANIFEST_NAMES:
                    handle = archive.extractfile(member)
                    manifest_data = handle.read(MAX_MANIFEST_BYTES) if handle else b""
                    names = [PurePosixPath(member.name).as_posix()]
                    break
    with tarfile.open(source.path, "r:*") as archive:
        manifest = _archive_manifest(source, lambda n: manifest_data or b"", names or [])
        for member in archive:
            if member.isdir() or skipped(member.name):
                continue
            if manifest is not None and PurePosixPath(member.name).as_posix() in MANIFEST_NAMES:
                continue

            def read(member: tarfile.TarInfo = member) -> bytes:
                handle = archive.extractfile(member)
                return handle.read() if handle is not None else b""

            yield from _archive_member(
                member.name,
                size=member.size,
                regular=member.isfile(),
                read=read,
                manifest=manifest,
                max_bytes=max_bytes,
            )
        yield from _missing_rows(manifest)


def _zip_manifest(archive: zipfile.ZipFile, name: str) -> bytes:
    """A manifest member, inflated no further than MAX_MANIFEST_BYTES (a zip bomb stops there)."""
    with archive.open(name) as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidRequest(
            f"the manifest {name!r} in the archive is larger than {MAX_MANIFEST_BYTES} bytes"
        )
    return data


def _archive_manifest(
    source: ArchiveSource, read: Callable[[str], bytes], names: list[str]
) -> dict[str, ManifestRow] | None:
    if source.manifest is not None:
        rows = parse_manifest(read_manifest(source.manifest), name=source.manifest.name)
    else:
        inside = next((n for n in names if PurePosixPath(n).as_posix() in MANIFEST_NAMES), None)
        if inside is None:
            return None
        rows = parse_manifest(read(inside), name=inside)
    table: dict[str, ManifestRow] = {}
    for number, row in enumerate(rows):
        key = PurePosixPath(row.path).as_posix() if row.path else f"\0row {number + 1}"
        table.setdefault(key, row)
    return table


def _archive_member(
    name: str,
    *,
    size: int,
    regular: bool,
    read: Callable[[], bytes],
    manifest: dict[str, ManifestRow] | None,
    max_bytes: int,
) -> Iterator[Member]:
    if manifest is not None:
        row = manifest.pop(PurePosixPath(name).as_posix(), None)
        if row is None:
            return  # not in the manifest: not imported
        metadata = row.metadata
    else:
        metadata = label_from(name)
    if not regular:
        yield Member(name, reject=("not_a_regular_file", "links and device files are not imported"))
    elif _unsafe(name):
        yield Member(name, reject=("unsafe_path", "path leaves the archive"))
    elif reason := _too_large(size, max_bytes):
        yield Member(name, reject=reason)
    else:
        yield Member(name, metadata, read=read)


def _missing_rows(manifest: dict[str, ManifestRow] | None) -> Iterator[Member]:
    for key, row in (manifest or {}).items():
        if row.error:
            yield Member(key.lstrip("\0"), reject=("manifest_row_invalid", row.error))
        else:
            yield Member(key, reject=("missing_member", "the manifest names a file the archive lacks"))


def _folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative name, path) of the folder's files in name order; hidden entries skipped."""
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if skipped(name) or path.is_dir():
            continue
        yield name, path


def _file_member(
    name: str, path: Path, *, inside: tuple[Path, ...], metadata: dict[str, Any], max_bytes: int
) -> Member:
    """A server file as a member: links that leave ``inside`` are rejected, never followed."""
    try:
        real = path.resolve(strict=True)
        if not any(real.is_relative_to(root) for root in inside) or not real.is_file():
            return Member(name, reject=("not_a_regular_file", "a link out of the allowed folders"))
        if reason := _too_large(real.stat().st_size, max_bytes):
            return Member(name, reject=reason)
    except (OSError, RuntimeError, ValueError) as exc:
        return Member(name, reject=("file_unreadable", str(exc)))
    return Member(name, metadata, read=real.read_bytes)


def _folder_members(folder: Path, *, max_bytes: int) -> Iterator[Member]:
    for name, path in _folder_files(folder):
        yield _file_member(name, path, inside=(folder,), metadata=label_from(name), max_bytes=max_bytes)


def _read_groundtruth(folder: Path) -> dict[str, list[str]]:
    from app.services.groundtruth import read_groundtruth

    path = (folder / GROUNDTRUTH_NAME).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise InvalidRequest(f"{GROUNDTRUTH_NAME} is a link out of the folder")
    return read_groundtruth(path)


def _holidays_files(folder: Path) -> Iterator[tuple[str, Path]]:
    images = folder / "jpg" if (folder / "jpg").is_dir() else folder
    for name, path in _folder_files(images):
        if name != GROUNDTRUTH_NAME and not name.endswith((".dat", ".json", ".txt")):
            yield name, path


def _holidays_members(source: HolidaysSource, *, max_bytes: int) -> Iterator[Member]:
    """Holidays layout: each image's label is its query's name (``100000`` for 100000.jpg and
    its relevant 100001.jpg ...), with ``role`` query or relevant; other images get no label."""
    groups: dict[str, tuple[str, str]] = {}
    for query, relevant in _read_groundtruth(source.path).items():
        group = PurePosixPath(query).stem
        groups[PurePosixPath(query).name] = (group, "query")
        for name in relevant:
            groups.setdefault(PurePosixPath(name).name, (group, "relevant"))
    for name, path in _holidays_files(source.path):
        found = groups.get(PurePosixPath(name).name)
        metadata = {"label": found[0], "role": found[1]} if found else {}
        yield _file_member(name, path, inside=(source.path,), metadata=metadata, max_bytes=max_bytes)


def _manifest_members(source: ManifestSource, *, max_bytes: int) -> Iterator[Member]:
    folder = source.path.parent
    inside = source.roots if source.roots is not None else (Path("/"),)
    for number, row in enumerate(parse_manifest(read_manifest(source.path), name=source.path.name), 1):
        if row.path is None:
            yield Member(f"row {number}", reject=("manifest_row_invalid", row.error or "bad row"))
            continue
        path = Path(row.path)
        yield _file_member(
            row.path,
            path if path.is_absolute() else folder / path,
            inside=inside,
            metadata=row.metadata,
            max_bytes=max_bytes,
        )


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
