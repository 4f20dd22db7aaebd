"""A ``milvus-lite server`` on 127.0.0.1 for every test that runs on Milvus (issue 17): started once
per test session by the first test that asks for ``milvus_uri`` (tests/conftest.py exposes it),
shared by all, stopped at the end. Where pymilvus or milvus-lite is not installed those tests skip,
or fail with ``CBIR_REQUIRE_MILVUS=1`` (as ``.ci/run`` sets), so that CI cannot pass by skipping."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from index.milvus_lite import MilvusLiteError, milvus_lite_binary, milvus_lite_server

INSTALL = "pip install -e '.[dev]'"


def milvus_required() -> bool:
    return os.environ.get("CBIR_REQUIRE_MILVUS") == "1"


def milvus_unavailable(reason: str) -> NoReturn:
    """Skip (fail under ``CBIR_REQUIRE_MILVUS=1``) a test that needs Milvus, saying why."""
    if milvus_required():
        pytest.fail(f"{reason} (CBIR_REQUIRE_MILVUS=1: the Milvus tests must run)")
    pytest.skip(reason)


def require_pymilvus() -> None:
    """Skip (or fail, as ``milvus_unavailable``) without pymilvus."""
    if importlib.util.find_spec("pymilvus") is None:
        milvus_unavailable(f"pymilvus is not installed ({INSTALL})")


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a ``milvus-lite server`` this session starts and stops."""
    require_pymilvus()
    if milvus_lite_binary() is None:
        milvus_unavailable(f"milvus-lite is not installed ({INSTALL}): the Milvus backend is not tested")
    folder = tmp_path_factory.mktemp("milvus")
    try:
        with milvus_lite_server(folder / "data") as uri:
            yield uri
    except MilvusLiteError as exc:
        pytest.fail(str(exc))
