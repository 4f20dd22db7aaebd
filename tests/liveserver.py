"""A real uvicorn process serving the app on a data folder: tests that kill it and start it again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS_DIR = ROOT.parent / "shared" / "datasets"


def run_in_sqlite_pass_only() -> None:
    """Skip in the PostgreSQL pass of ``make test``: these servers run on SQLite in both passes
    (``CBIR_TEST_SERVER_DATABASE_URL`` is unset there), so a second run would test nothing new."""
    if os.environ.get("CBIR_TEST_DATABASE_URL") and not os.environ.get("CBIR_TEST_SERVER_DATABASE_URL"):
        pytest.skip("a live server on SQLite: runs in the SQLite pass")


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBIR_")}
    env.update(
        CBIR_DATA_DIR=str(data_dir),
        CBIR_DATASETS_DIR=str(DATASETS_DIR),
        CBIR_DATABASE_URL=os.environ.get("CBIR_TEST_SERVER_DATABASE_URL", ""),
        CBIR_TORCH_THREADS="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


@dataclass
class LiveServer:
    """``start()`` launches ``uvicorn app.main:create_app`` on a socket bound here (no port race)."""

    data_dir: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    # Runs in the server process before exec (resource limits, signal dispositions).
    preexec_fn: Callable[[], None] | None = None
    # The address the socket is bound to (a non-loopback one: a service reachable from elsewhere).
    host: str = "127.0.0.1"
    url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 120.0) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(64)
        self.url = f"http://{self.host}:{sock.getsockname()[1]}"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "app.main:create_app",
                    "--fd",
                    str(sock.fileno()),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=server_env(self.data_dir, **self.env),
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(sock.fileno(),),
                preexec_fn=self.preexec_fn,
            )
        sock.close()  # the server holds its own copy
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not answer /api/v1/health in {timeout:.0f} s:\n{self.tail()}"
                )
            time.sleep(0.1)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def api(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, f"{self.url}/api/v1{path}", timeout=60, **kwargs)  # type: ignore[arg-type]
