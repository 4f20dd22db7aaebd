"""Source kind ``holidays``: a server folder in the INRIA Holidays layout, and its ground truth.

The folder holds ``groundtruth.json`` (``{query file: [relevant files]}``) beside the images
(directly or in ``jpg/``). Each image's label is its query's name (``100000`` for 100000.jpg and
its relevant 100001.jpg ...), with ``role`` query or relevant; other images get no label.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.core.errors import InvalidRequest
from app.ingest.sources.base import Member, Reading, Source
from app.ingest.sources.files import capped, folder_entry, folder_files

GROUNDTRUTH_NAME = "groundtruth.json"


def read_groundtruth(path: Path) -> dict[str, list[str]]:
    """A JSON object ``{query name: [relevant names]}``; InvalidRequest when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"cannot read ground truth {str(path)[:200]!r}: {exc}") from None
    return check_groundtruth(data)


def check_groundtruth(data: Any) -> dict[str, list[str]]:
    if not isinstance(data, dict) or not data:
        raise InvalidRequest("the ground truth must be a non-empty JSON object {query: [relevant, ...]}")
    for query, relevant in data.items():
        if not isinstance(relevant, list) or not all(isinstance(r, str) for r in relevant):
            raise InvalidRequest(f"ground truth entry {str(query)[:80]!r} must be a list of file names")
    return {str(k): list(v) for k, v in data.items()}


def folder_groundtruth(folder: Path) -> dict[str, list[str]]:
    """The ground truth of a Holidays-style folder; a link out of the folder is refused."""
    path = (folder / GROUNDTRUTH_NAME).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise InvalidRequest(f"{GROUNDTRUTH_NAME} is a link out of the folder")
    return read_groundtruth(path)


@dataclass(frozen=True)
class HolidaysSource(Source):
    path: Path  # a folder holding groundtruth.json and the images (directly or in jpg/)

    kind = "holidays"

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        return {"path": str(self.path)}

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> HolidaysSource:
        return cls(Path(params["path"]))

    def members(self, reading: Reading) -> Iterator[Member]:
        groups: dict[str, tuple[str, str]] = {}
        for query, relevant in folder_groundtruth(self.path).items():
            group = PurePosixPath(query).stem
            groups[PurePosixPath(query).name] = (group, "query")
            for name in relevant:
                groups.setdefault(PurePosixPath(name).name, (group, "relevant"))

        def metadata(name: str) -> dict[str, Any]:
            found = groups.get(PurePosixPath(name).name)
            return {"label": found[0], "role": found[1]} if found else {}

        members = (
            folder_entry(
                name, path, problem, inside=self.path, metadata=metadata(name), max_bytes=reading.max_bytes
            )
            for name, path, problem in self._files()
        )
        yield from capped(members, limit=reading.limits.folder_files)

    def count(self, reading: Reading) -> int | None:
        return sum(1 for _ in self.members(reading))  # lists directories; reads no file

    def _files(self) -> Iterator[tuple[str, Path, OSError | None]]:
        images = self.path / "jpg" if (self.path / "jpg").is_dir() else self.path
        for name, path, problem in folder_files(images):
            if name != GROUNDTRUTH_NAME and not name.endswith((".dat", ".json", ".txt")):
                yield name, path, problem
