"""Source kind ``manifest``: a CSV or JSON-lines file on this machine naming the files to import
and their metadata (the format: app/ingest/sources/manifests.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import InvalidRequest
from app.ingest.sources.base import Member, Reading, Source
from app.ingest.sources.files import confine, file_member
from app.ingest.sources.manifests import parse_manifest, read_manifest


@dataclass(frozen=True)
class ManifestSource(Source):
    path: Path  # a CSV or JSON-lines file; its paths are relative to its folder
    roots: tuple[Path, ...] | None = None  # where its files may lie (None: anywhere, the CLI)

    kind = "manifest"

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        roots = [str(r) for r in self.roots] if self.roots is not None else None
        return {"path": str(self.path), "roots": roots}

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> ManifestSource:
        roots = params.get("roots")
        return cls(Path(params["path"]), tuple(Path(r) for r in roots) if roots is not None else None)

    def members(self, reading: Reading) -> Iterator[Member]:
        folder = self.path.parent
        inside = self.roots if self.roots is not None else (Path("/"),)
        for number, row in enumerate(parse_manifest(read_manifest(self.path), name=self.path.name), 1):
            if row.path is None:
                yield Member(f"row {number}", reject=(row.code, row.error or "bad row"))
                continue
            path = Path(row.path)
            member = file_member(
                row.path,
                path if path.is_absolute() else folder / path,
                inside=inside,
                metadata=row.metadata,
                max_bytes=reading.max_bytes,
            )
            yield member or Member(row.path, reject=("not_a_regular_file", "a folder, not a file"))

    def count(self, reading: Reading) -> int | None:
        return len(parse_manifest(read_manifest(self.path), name=self.path.name))


def check_manifest(path: Path, *, roots: list[Path] | None = None) -> ManifestSource:
    path = confine(path, roots)
    if not path.is_file():
        raise InvalidRequest(f"{str(path)[:200]!r} is not a file")
    parse_manifest(read_manifest(path), name=path.name)  # 422 now if unreadable
    return ManifestSource(path, tuple(roots) if roots is not None else None)
