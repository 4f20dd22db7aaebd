"""The MNIST demo (`cbir demo`) built once per test session and shared by every test that needs it.

Building it stores 60,000 digits, screens the candidates and trains the winner an epoch
(``CBIR_DEMO_EPOCHS=1``): minutes on 2 cores, so a session builds it once (the ``demo_build``
fixture in ``tests/conftest.py``) in a SQLite data folder, and each user works on a copy
(``copy_data``: images and checkpoints hard-linked, the database and index files copied), never
on the build itself. ``CBIR_BROWSER_DEMO_CACHE`` names a folder in which the demo is built once
and reused across sessions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_EPOCHS = "1"


def demo_env(data_dir: Path, datasets_dir: Path) -> dict[str, str]:
    """The environment of a `cbir demo` or a server on ``data_dir``: SQLite in the data folder,
    one torch thread, a one-epoch demo; no other ``CBIR_*`` variable of the caller leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    env.update(
        CBIR_DATA_DIR=str(data_dir),
        CBIR_DATASETS_DIR=str(datasets_dir),
        CBIR_DATABASE_URL="",  # SQLite in the data folder
        CBIR_TORCH_THREADS="1",
        CBIR_DEMO_EPOCHS=DEMO_EPOCHS,
        OMP_NUM_THREADS="1",
    )
    return env


def build_demo(data_dir: Path, *, datasets_dir: Path, log: Path) -> None:
    """Run `cbir demo` on ``data_dir`` in a child process (what `make run` does first); fails the
    test with the end of its output when it exits non-zero. A complete demo is left as it is."""
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "demo"],
            cwd=ROOT,
            env=demo_env(data_dir, datasets_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        pytest.fail(f"`cbir demo` failed (exit {done.returncode}):\n{tail}")


def copy_data(source: Path, target: Path) -> None:
    """A working copy of a data folder: images and checkpoints hard-linked (content-addressed,
    never modified in place), the database and index files copied."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name in ("images", "checkpoints", "datasets"):
            shutil.copytree(entry, target / entry.name, copy_function=link_or_copy)
        elif entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
