"""Manifests: a CSV or JSON-lines file naming the files to import and their metadata.

A manifest comes from the server (an admin's manifest import), beside an uploaded archive (the
``manifest`` part) or inside it (``manifest.csv`` or ``manifest.jsonl`` at its top). A bad row
becomes a row with an error; a manifest that cannot be read as a whole (not UTF-8, not CSV, no
path column, too large) raises ``BadManifest`` naming the file the user knows (never a temporary
name) and, for bytes that are not UTF-8, the byte and its offset.

Inside an archive an unreadable manifest is the import's one report line: its rows choose the
members and their labels, so importing the archive without it would store what the user meant to
leave out under labels they meant to replace (and the same bytes are never stored twice, so a
second import could not correct them). The job reports the line and fails with it
(``SOURCE_FAILURES``, app/ingest/jobs.py).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.core.errors import BadManifest, BadMetadata, BadName, PayloadTooLarge
from app.core.usertext import check_metadata, check_name, parse_json

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# Metadata a manifest row may carry: keys and values are kept short.
MAX_META_KEYS, MAX_META_CHARS = 32, 512
PATH_COLUMNS = ("path", "file", "filename", "member")
# Report codes that mean the source itself could not be read: the job lists the line and fails.
SOURCE_FAILURES = frozenset({BadManifest.code})


@dataclass(frozen=True)
class ManifestRow:
    path: str | None  # None: the row is unusable, ``error`` says why
    metadata: dict[str, Any]
    error: str | None = None
    code: str = "manifest_row_invalid"  # the report's code for a row with an error


def read_manifest(path: Path, *, name: str | None = None) -> bytes:
    """A manifest file's bytes, never more than MAX_MANIFEST_BYTES read (413 when larger);
    ``name``: what the user calls it (default: the file's name)."""
    with path.open("rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise PayloadTooLarge(f"the manifest {name or path.name!r} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def parse_manifest(data: bytes, *, name: str) -> list[ManifestRow]:
    """CSV with a header (a ``path`` column, optional ``label``, other columns as metadata) or JSON
    lines (``{"path": ..., "label": ..., "metadata": {...}}``, other keys as metadata).

    A file that cannot be read at all raises BadManifest; a bad row becomes a row with an error.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise BadManifest(
            f"the manifest {name!r} is not UTF-8 text: byte 0x{data[offset]:02X} at offset {offset} "
            f"(line {line}) does not decode; save it as UTF-8"
        ) from None
    stripped = text.lstrip()
    if name.endswith(".jsonl") or stripped.startswith("{"):
        return [_jsonl_row(line, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        return _csv_rows(text, name=name)
    except csv.Error as exc:
        raise BadManifest(f"the manifest {name!r} is not readable CSV: {exc}") from None


def _csv_rows(text: str, *, name: str) -> list[ManifestRow]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise BadManifest(
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
        value = parse_json(line)
    except json.JSONDecodeError as exc:
        return ManifestRow(None, {}, f"line {number} is not JSON: {exc.msg}")
    except BadMetadata as exc:  # NaN or infinity, a number past int64, nested far too deep
        return ManifestRow(None, {}, f"line {number}: {exc.detail}", code=exc.code)
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
    for key, value in list(metadata.items())[:MAX_META_KEYS]:  # scalars only, but any label
        if isinstance(value, str | int | float | bool) or value is None or key == "label":
            clean[str(key)[:64]] = value[:MAX_META_CHARS] if isinstance(value, str) else value
    try:  # the rules every path obeys (app/core/usertext.py): a label object is refused, not dropped
        check_name(path, what="the path")
        check_metadata(clean, what=f"the metadata of {path[:100]!r}")
    except (BadMetadata, BadName) as exc:
        return ManifestRow(None, {}, exc.detail, code=exc.code)
    if "label" in clean and clean["label"] is not None:
        clean["label"] = str(clean["label"])
    return ManifestRow(path, clean)


# -- with an archive -----------------------------------------------------------------------------
def zip_manifest(archive: zipfile.ZipFile, name: str) -> bytes:
    """A manifest member, inflated no further than MAX_MANIFEST_BYTES (a zip bomb stops there)."""
    with archive.open(name) as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BadManifest(f"the manifest {name!r} in the archive is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def archive_manifest(
    *, uploaded: Path | None, uploaded_name: str | None, read: Callable[[str], bytes], names: list[str]
) -> dict[str, ManifestRow] | None:
    """The rows of an archive's manifest (``uploaded`` beside it, else the one among ``names``)
    by member path, or None without one. Rows without a usable path are keyed "\\0row N". An
    unreadable manifest gives one row, keyed "\\0" + its name, with the ``bad_manifest`` error
    (``unreadable`` tells): its report line."""
    if uploaded is not None:
        name = uploaded_name or "manifest"  # a job queued before the name was kept
    else:
        inside = next((n for n in names if PurePosixPath(n).as_posix() in MANIFEST_NAMES), None)
        if inside is None:
            return None
        name = inside
    try:
        data = read_manifest(uploaded, name=name) if uploaded is not None else read(name)
        rows = parse_manifest(data, name=name)
    except BadManifest as exc:
        return {"\0" + name: ManifestRow(None, {}, exc.detail, code=exc.code)}
    table: dict[str, ManifestRow] = {}
    for number, row in enumerate(rows):
        key = PurePosixPath(row.path).as_posix() if row.path else f"\0row {number + 1}"
        table.setdefault(key, row)
    return table


def finished_state(errors: list[dict[str, Any]]) -> dict[str, str]:
    """The state of an import that read its whole source, from its reported errors: failed, with
    that line as its error, when one says the source itself is unreadable."""
    fatal = next((e for e in errors if e["code"] in SOURCE_FAILURES), None)
    return (
        {"state": "succeeded"}
        if fatal is None
        else {"state": "failed", "error": f"{fatal['code']}: {fatal['detail']}"}
    )


def unreadable(manifest: dict[str, ManifestRow] | None) -> bool:
    """Whether ``archive_manifest`` could not read the manifest (then no member is imported)."""
    return manifest is not None and any(row.code in SOURCE_FAILURES for row in manifest.values())
