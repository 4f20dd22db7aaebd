"""Source kind ``idx``: IDX files on the server (MNIST's format), each image as a PNG member."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from app.ingest.sources.base import Member, Reading, Source
from app.ingest.sources.datasets import png_bytes, read_idx

IDX_IMAGES = re.compile(r"^(?P<stem>.*?)[-.]?images?[-.]idx3[-.]ubyte(\.gz)?$")


@dataclass(frozen=True)
class IdxSource(Source):
    images: tuple[Path, ...]  # IDX image files (optionally .gz), each with its labels file or None
    labels: tuple[Path | None, ...]

    kind = "idx"

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        return {
            "images": [str(p) for p in self.images],
            "labels": [str(p) if p else None for p in self.labels],
        }

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> IdxSource:
        return cls(
            tuple(Path(p) for p in params["images"]), tuple(Path(p) if p else None for p in params["labels"])
        )

    def members(self, reading: Reading) -> Iterator[Member]:
        """Each IDX image as a PNG named ``<file stem>-<index>.png`` with its label."""
        for image_path, label_path in zip(self.images, self.labels, strict=True):
            images = read_idx(image_path)
            labels = read_idx(label_path) if label_path is not None else None
            if images.ndim != 3 or (labels is not None and len(labels) != len(images)):
                raise ValueError(f"{image_path.name}: not an image file matching its labels")
            stem = IDX_IMAGES.match(image_path.name).group("stem") or "idx"  # type: ignore[union-attr]
            for i in range(len(images)):
                metadata: dict[str, Any] = {"file": image_path.name, "index": i}
                if labels is not None:
                    metadata["label"] = str(int(labels[i]))
                yield Member(f"{stem}-{i:05d}.png", metadata, read=partial(png_bytes, images[i]))

    def count(self, reading: Reading) -> int | None:
        return sum(_idx_count(path) for path in self.images)


def _idx_count(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        header = handle.read(8)
    return int.from_bytes(header[4:8], "big")


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
