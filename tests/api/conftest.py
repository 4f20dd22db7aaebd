"""Fixtures the API tests of server-folder imports share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def root(tmp_path: Path, make_png: Callable[..., bytes]) -> Path:
    """An allowed root holding photos/{cat,dog}/*.png, and a secret folder beside it."""
    base = tmp_path / "root"
    for label, seeds in (("cat", (1, 2, 3)), ("dog", (4, 5))):
        folder = base / "photos" / label
        folder.mkdir(parents=True)
        for seed in seeds:
            (folder / f"{seed}.png").write_bytes(make_png(seed))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.png").write_bytes(make_png(99))
    return base
