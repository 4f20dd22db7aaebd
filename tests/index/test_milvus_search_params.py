"""The search parameters sent to Milvus: the collection's ef_search / nprobe (milvus-lite ignores them,
so what is tested is what is sent, not speed)."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from app.indexing.store_index import StoreIndex
from index import SearchKnobs
from index.faiss_store import FaissStore
from tests.milvus_server import require_pymilvus


@pytest.fixture
def milvus_store() -> Any:
    """``index.milvus_store`` (skipped without pymilvus, failed under CBIR_REQUIRE_MILVUS=1)."""
    require_pymilvus()
    import index.milvus_store

    return index.milvus_store


@pytest.mark.parametrize(
    ("kind", "k", "knobs", "sent"),
    [
        ("Flat", 10, SearchKnobs(ef_search=200, nprobe=4), {}),
        ("HNSW32", 10, None, {"ef": 64}),
        ("HNSW32", 10, SearchKnobs(ef_search=200), {"ef": 200}),
        ("HNSW32,Flat", 100, SearchKnobs(ef_search=16), {"ef": 100}),  # ef >= k
        ("HNSW16", 50_000, SearchKnobs(ef_search=16), {"ef": 32_768}),  # Milvus's bound
        ("IVF64,Flat", 10, None, {"nprobe": 16}),
        ("IVF64,SQ8", 10, SearchKnobs(nprobe=32, ef_search=500), {"nprobe": 32}),
        ("IVF8,Flat", 10, SearchKnobs(nprobe=32), {"nprobe": 8}),  # at most nlist
        ("IVF256,PQ8x8", 10, SearchKnobs(nprobe=3), {"nprobe": 3}),
    ],
)
def test_search_params_follow_the_knobs(
    milvus_store: Any, kind: str, k: int, knobs: SearchKnobs | None, sent: dict[str, int]
) -> None:
    assert milvus_store.milvus_search_params(kind, k=k, knobs=knobs) == sent


class Recording:
    """A Milvus client stand-in that keeps what ``search`` was sent."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent: list[dict[str, Any]] = []

    def search(self, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(kwargs["search_params"])
        return self.client.search(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_store_index_sends_the_collection_knobs_and_a_search_override(
    milvus_store: Any, request: pytest.FixtureRequest
) -> None:
    store = milvus_store.MilvusStore(request.getfixturevalue("milvus_uri"))
    recording = Recording(store._client)
    store._client = recording
    space = f"cbir_knobs_{uuid.uuid4().hex}"
    vectors = np.eye(8, dtype=np.float32)
    try:
        store.create(space, dim=8, kind="HNSW16")
        store.upsert(space, ids=np.arange(8), vectors=vectors)
        index = StoreIndex(store, space, dim=8, kind="HNSW16", meta={})
        index.set_search_knobs(SearchKnobs(ef_search=48))

        assert index.search(vectors[:1], 3)[1][0, 0] == 0
        index.search(vectors[:1], 3, knobs=SearchKnobs(ef_search=96))
        index.search(vectors[:1], 100)

        assert [sent["params"] for sent in recording.sent] == [{"ef": 48}, {"ef": 96}, {"ef": 100}]
    finally:
        store.drop(space)
        store.close()


def test_faiss_store_passes_the_knobs_to_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    store = FaissStore()
    vectors = np.eye(8, dtype=np.float32)
    store.create("s", dim=8, kind="HNSW16")
    store.upsert("s", ids=np.arange(8), vectors=vectors)
    index = store._spaces["s"].index
    sent: list[SearchKnobs | None] = []
    search = index.search

    def recording(*args: Any, knobs: SearchKnobs | None = None, **kwargs: Any) -> Any:
        sent.append(knobs)
        return search(*args, knobs=knobs, **kwargs)

    monkeypatch.setattr(index, "search", recording)
    assert store.search("s", vectors[:1], 1, knobs=SearchKnobs(ef_search=300))[1][0, 0] == 0
    assert sent == [SearchKnobs(ef_search=300)]
