"""Without pymilvus the Milvus tests skip, except under CBIR_REQUIRE_MILVUS=1 (CI), where they fail."""

from __future__ import annotations

import importlib.util

import pytest

from tests import milvus_server


@pytest.fixture
def no_pymilvus(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        milvus_server.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pymilvus" else real(name, *a),
    )


def test_missing_pymilvus_skips_by_default(no_pymilvus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBIR_REQUIRE_MILVUS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pymilvus is not installed"):
        milvus_server.require_pymilvus()


def test_missing_pymilvus_fails_when_milvus_is_required(
    no_pymilvus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CBIR_REQUIRE_MILVUS", "1")
    with pytest.raises(pytest.fail.Exception, match="CBIR_REQUIRE_MILVUS=1"):
        milvus_server.require_pymilvus()


def test_missing_milvus_lite_fails_when_milvus_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_REQUIRE_MILVUS", "1")
    with pytest.raises(pytest.fail.Exception, match="milvus-lite is not installed"):
        milvus_server.milvus_unavailable("milvus-lite is not installed")
