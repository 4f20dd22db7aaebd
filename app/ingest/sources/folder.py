"""Source kind ``folder``: a folder on this machine, subfolder names as labels; and the choice of
a server folder's layout (plain images, IDX files or a Holidays-style folder)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import InvalidRequest
from app.ingest.sources.base import Member, Reading, Source, label_from
from app.ingest.sources.files import capped, confine, folder_entry, folder_files
from app.ingest.sources.holidays import GROUNDTRUTH_NAME, HolidaysSource, folder_groundtruth
from app.ingest.sources.idx import find_idx

LAYOUTS = ("auto", "images", "idx", "holidays")


@dataclass(frozen=True)
class FolderSource(Source):
    path: Path  # a resolved folder on this machine; subfolder names become labels

    kind = "folder"

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        return {"path": str(self.path)}

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> FolderSource:
        return cls(Path(params["path"]))

    def members(self, reading: Reading) -> Iterator[Member]:
        members = (
            folder_entry(
                name, path, problem, inside=self.path, metadata=label_from(name), max_bytes=reading.max_bytes
            )
            for name, path, problem in folder_files(self.path)
        )
        yield from capped(members, limit=reading.limits.folder_files)

    def count(self, reading: Reading) -> int | None:
        return sum(1 for _ in self.members(reading))  # lists directories; reads no file


def check_folder(path: Path, *, roots: list[Path] | None = None, layout: str = "auto") -> Source:
    """A server folder to import. ``layout``: ``images`` (subfolder names are labels), ``idx``
    (MNIST-format IDX files), ``holidays`` (groundtruth.json beside the images) or ``auto``."""
    path = confine(path, roots)
    if not path.is_dir():
        raise InvalidRequest(f"{str(path)[:200]!r} is not a folder")
    if layout not in LAYOUTS:
        raise InvalidRequest(f"layout must be auto, images, idx or holidays, not {layout[:40]!r}")
    if layout in ("auto", "idx"):
        idx = find_idx(path)
        if idx is not None:
            return idx
        if layout == "idx":
            raise InvalidRequest(f"{str(path)[:200]!r} holds no *-images-idx3-ubyte[.gz] file")
    if layout in ("auto", "holidays") and (path / GROUNDTRUTH_NAME).is_file():
        folder_groundtruth(path)  # a bad file is a 422 now, not a failed job later
        return HolidaysSource(path)
    if layout == "holidays":
        raise InvalidRequest(f"{str(path)[:200]!r} has no {GROUNDTRUTH_NAME}")
    return FolderSource(path)
