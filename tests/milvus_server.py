"""A ``milvus-lite server`` on 127.0.0.1 for every test that runs on Milvus (issue 17): started once
per test session by the first test that asks for ``milvus_uri`` (tests/conftest.py exposes it),
shared by all, stopped at the end; skipped where pymilvus or milvus-lite is not installed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from index.milvus_lite import MilvusLiteError, milvus_lite_binary, milvus_lite_server


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a ``milvus-lite server`` this session starts and stops."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install -e '.[dev]')")
    if milvus_lite_binary() is None:
        pytest.skip(
            "milvus-lite is not installed (pip install -e '.[dev]'): the Milvus backend is not tested"
        )
    folder = tmp_path_factory.mktemp("milvus")
    try:
        with milvus_lite_server(folder / "data") as uri:
            yield uri
    except MilvusLiteError as exc:
        pytest.fail(str(exc))
