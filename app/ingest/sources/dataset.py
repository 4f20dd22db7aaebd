"""Source kind ``dataset``: a split of a built-in dataset (MNIST; app/ingest/sources/datasets.py),
each image a PNG member labelled with its digit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import InvalidRequest
from app.ingest.sources.base import Member, Reading, Source
from app.ingest.sources.datasets import DATASETS, MNIST_FILES, load_mnist, png_bytes


@dataclass(frozen=True)
class DatasetSource(Source):
    dataset: str
    split: str  # "train", "test" or "all"

    kind = "dataset"

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split}

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> DatasetSource:
        return cls(params["dataset"], params["split"])

    def members(self, reading: Reading) -> Iterator[Member]:
        for split in self._splits():
            images, labels = _mnist(split, reading)
            for i in range(len(images)):
                yield Member(
                    f"{self.dataset}-{split}-{i:05d}.png",
                    {"label": str(int(labels[i])), "dataset": self.dataset, "split": split, "index": i},
                    read=partial(png_bytes, images[i]),
                )

    def count(self, reading: Reading) -> int | None:
        return sum(len(_mnist(split, reading)[1]) for split in self._splits())

    def _splits(self) -> tuple[str, ...]:
        return tuple(MNIST_FILES) if self.split == "all" else (self.split,)


def _mnist(split: str, reading: Reading) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(split, datasets_dir=reading.datasets_dir, download_dir=reading.data_dir / "datasets")


def check_dataset(dataset: str, split: str) -> DatasetSource:
    if dataset not in DATASETS:
        raise InvalidRequest(f"unknown dataset {dataset!r}; built-in datasets: {sorted(DATASETS)}")
    splits = (*DATASETS[dataset], "all")
    if split not in splits:
        raise InvalidRequest(f"dataset {dataset!r} has splits {list(splits)}, not {split!r}")
    return DatasetSource(dataset, split)
