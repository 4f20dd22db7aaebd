"""A ``milvus-lite server`` in a child process on 127.0.0.1: the Milvus that the tests and
``cbir bench search`` talk to on one machine (a test double: it ignores ``ef`` and ``nprobe``,
lacks IVF_PQ and is slow; production figures come from a real Milvus).

Its default bind address is 0.0.0.0, so ``--host`` is always passed. One process owns a data
directory; several clients may share the server.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["MilvusLiteError", "free_port", "milvus_lite_binary", "milvus_lite_server"]

LOOPBACK = "127.0.0.1"


class MilvusLiteError(RuntimeError):
    """The server is not installed, exited, or did not answer in time."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def milvus_lite_binary() -> str | None:
    """The ``milvus-lite`` script beside this Python (its virtual environment) or on PATH."""
    beside = Path(sys.executable).with_name("milvus-lite")
    return str(beside) if beside.exists() else shutil.which("milvus-lite")


def _answers(uri: str) -> bool:
    from pymilvus import MilvusClient

    try:
        client = MilvusClient(uri=uri, timeout=2)
    except Exception:  # refused while it starts: pymilvus raises its own and gRPC's errors
        return False
    try:
        client.get_server_version()
        return True
    except Exception:
        return False
    finally:
        client.close()


@contextmanager
def milvus_lite_server(data_dir: Path, *, port: int | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Start ``milvus-lite server`` on ``data_dir`` (created when missing) at 127.0.0.1 and a free
    port, wait until it answers, yield its ``http://127.0.0.1:PORT``; terminate it on exit. Its
    output goes to ``data_dir/../<name>.log``, quoted in ``MilvusLiteError`` when it fails."""
    binary = milvus_lite_binary()
    if binary is None:
        raise MilvusLiteError("milvus-lite is not installed (pip install -e '.[dev]')")
    try:
        import pymilvus  # noqa: F401
    except ImportError:
        raise MilvusLiteError("pymilvus is not installed (pip install -e '.[dev]')") from None
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.with_name(f"{data_dir.name}.log")
    port = port or free_port()
    uri = f"http://{LOOPBACK}:{port}"
    command = [binary, "server", "--data-dir", str(data_dir), "--host", LOOPBACK, "--port", str(port)]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(uri):
                if server.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise MilvusLiteError(f"milvus-lite exited with {server.returncode}: {tail}")
                if time.monotonic() > deadline:
                    raise MilvusLiteError(f"milvus-lite did not answer on {uri} within {timeout:g} s")
                time.sleep(0.2)
            yield uri
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
