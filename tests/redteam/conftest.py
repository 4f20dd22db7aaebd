"""What the red-team tests share: real uvicorn servers on a `tiny` data folder, killed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.liveserver import LiveServer, run_in_sqlite_pass_only


@pytest.fixture
def live(tmp_path: Path) -> Iterator[list[LiveServer]]:
    """Servers the test appends here are killed when it ends (SQLite pass only)."""
    run_in_sqlite_pass_only()
    started: list[LiveServer] = []
    yield started
    for server in started:
        server.kill()


def tiny_server(tmp_path: Path) -> LiveServer:
    """A server (not started) on ``tmp_path/data``: `tiny` by default, imports on threads."""
    env = {"CBIR_IMPORT_PROCESSES": "0", "CBIR_DEFAULT_EMBEDDER": "tiny"}
    return LiveServer(tmp_path / "data", tmp_path / "server.log", env=env)
