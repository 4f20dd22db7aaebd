"""A small real Holidays subset for tests: a folder of JPEGs and its ground truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DATASETS_DIR

HOLIDAYS = DATASETS_DIR / "inria-holidays-dev"
# Groups 1031 and 1039 hold the same three photos (byte-identical files in the dataset).
GROUPS = (1000, 1001, 1002, 1003, 1004, 1005, 1031, 1039)


def require_holidays() -> Path:
    if not (HOLIDAYS / "groundtruth.json").is_file():
        pytest.skip(f"INRIA Holidays dev set not found at {HOLIDAYS}")
    return HOLIDAYS


def holidays_subset(folder: Path, groups: tuple[int, ...] = GROUPS) -> dict[str, list[str]]:
    """Copy the groups' images into ``folder``; returns their ground truth."""
    root = require_holidays()
    truth = json.loads((root / "groundtruth.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    subset = {q: r for q, r in truth.items() if int(q[:-4]) // 100 in groups}
    for name in [*subset, *(n for names in subset.values() for n in names)]:
        shutil.copyfile(root / "jpg" / name, folder / name)
    return subset
