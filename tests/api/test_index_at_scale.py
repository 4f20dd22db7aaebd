"""The index as a resource: kinds chosen per collection, rebuilt in the background while the old
index serves, recall measured and shown, deletes unfindable at once, filters, and 503 (never an
empty result) while a collection has no index that can serve."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.context import AppContext
from app.core.settings import Settings
from app.data.records import CollectionRecord
from app.indexing import builds
from app.main import create_app
from index import VectorIndex
from index.exact import exact_knn
from tests.api.helpers import assert_problem
from tests.synthetic import insert_synthetic

API = "/api/v1"
DIM = 64  # the tiny embedder's


def clustered(n: int, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, DIM))
    rows = centres[rng.integers(0, 30, size=n)] + rng.normal(scale=0.35, size=(n, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def context_of(client: TestClient) -> AppContext:
    return client.app.state.context  # type: ignore[attr-defined,no-any-return]


def record_of(ctx: AppContext, name: str) -> CollectionRecord:
    with ctx.db.session() as session:
        record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == name))
    assert record is not None
    return record


def seed_rows(client: TestClient, name: str, vectors: np.ndarray, **kwargs: object) -> np.ndarray:
    """Synthetic rows (no files) with these vectors, then the index caught up with them."""
    ctx = context_of(client)
    record = record_of(ctx, name)
    assert record.embedder_version is not None
    ids = insert_synthetic(
        ctx.db,
        collection_id=record.id,
        vectors=vectors,
        embedder=record.embedder,
        embedder_version=record.embedder_version,
        **kwargs,  # type: ignore[arg-type]
    )
    ctx.indexes.add(record, vectors=vectors, ids=ids)
    return ids


def similar(client: TestClient, name: str, image_id: int, **params: object) -> list[int]:
    response = client.get(f"{API}/collections/{name}/images/{image_id}/similar", params={"k": 10, **params})
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["hits"]]


def set_kind(client: TestClient, name: str, **body: object) -> dict:
    response = client.put(f"{API}/collections/{name}/index", json=body)
    assert response.status_code in (200, 202), response.text
    assert context_of(client).indexes.wait_for_build(record_of(context_of(client), name).id, timeout=60)
    index = client.get(f"{API}/collections/{name}/index")
    assert index.status_code == 200
    return index.json()


@pytest.fixture
def vectors() -> np.ndarray:
    return clustered(3000)


@pytest.fixture
def seeded(client: TestClient, collection: str, vectors: np.ndarray) -> np.ndarray:
    labels = [{"label": str(i % 10), "part": "even" if i % 2 == 0 else "odd"} for i in range(len(vectors))]
    return seed_rows(client, collection, vectors, metas=labels)


def test_index_resource_shows_kind_size_memory_params_and_recall(
    client: TestClient, collection: str, seeded: np.ndarray
) -> None:
    body = client.get(f"{API}/collections/{collection}/index").json()

    assert body["state"] == "ready" and body["factory"] == "auto" and body["kind"] == "Flat"
    assert body["ntotal"] == len(seeded) and body["dim"] == DIM
    assert body["memory_bytes"] >= len(seeded) * DIM * 4
    assert body["high_water_mark"] == int(seeded.max())
    assert body["recall_at_10"] == 1.0 and body["recall_measured_at"]


def test_changing_kind_rebuilds_in_the_background_and_measures_recall(
    client: TestClient, collection: str, seeded: np.ndarray
) -> None:
    response = client.put(
        f"{API}/collections/{collection}/index", json={"factory": "HNSW32", "ef_search": 48}
    )
    assert response.status_code == 202, response.text
    # The old index serves meanwhile: a search answers now, never 503.
    assert similar(client, collection, int(seeded[0]))[0] != int(seeded[0])

    body = set_kind(client, collection)

    assert body["state"] == "ready" and body["kind"] == "HNSW32" and body["factory"] == "HNSW32"
    assert body["params"] == {"ef_search": 48}
    assert body["recall_at_10"] >= 0.95 and body["ntotal"] == len(seeded)
    measured = client.post(f"{API}/collections/{collection}/index/recall").json()
    assert measured["recall_at_10"] >= 0.95 and measured["recall_measured_at"] >= body["recall_measured_at"]


def test_writes_during_a_background_rebuild_reach_the_new_index(
    client: TestClient, collection: str, seeded: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real = builds.load_vectors

    def slow_load(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        gate.wait(30)
        return result

    monkeypatch.setattr(builds, "load_vectors", slow_load)
    assert client.put(f"{API}/collections/{collection}/index", json={"factory": "HNSW16"}).status_code == 202
    later = seed_rows(client, collection, clustered(20, seed=9), tag="later")
    assert client.delete(f"{API}/images/{int(seeded[5])}").status_code == 204
    gate.set()

    body = set_kind(client, collection)

    assert body["kind"] == "HNSW16" and body["ntotal"] == len(seeded) + 20 - 1
    index = context_of(client).indexes.get(record_of(context_of(client), collection))
    assert index is not None and index.contains(int(later[0])) and not index.contains(int(seeded[5]))


def test_search_parameters_per_query_are_validated_and_used(
    client: TestClient, collection: str, seeded: np.ndarray
) -> None:
    set_kind(client, collection, factory="IVF32,PQ8,RFlat")

    wide = similar(client, collection, int(seeded[1]), nprobe=32, k_factor=20)
    narrow = client.get(
        f"{API}/collections/{collection}/images/{int(seeded[1])}/similar", params={"nprobe": 1, "k_factor": 1}
    )

    assert narrow.status_code == 200 and len(wide) == 10
    assert_problem(client.get(f"{API}/collections/{collection}/images/1/similar?nprobe=0"), 422)
    assert_problem(client.get(f"{API}/collections/{collection}/images/1/similar?ef_search=x"), 422)


@pytest.mark.parametrize("bad", ["NoSuchIndex", "IVF16,PQ7", "Flat'; drop table images; --"])
def test_a_factory_faiss_cannot_build_is_a_422(
    client: TestClient, collection: str, seeded: np.ndarray, bad: str
):
    body = assert_problem(client.put(f"{API}/collections/{collection}/index", json={"factory": bad}), 422)
    assert "factory" in body["detail"]
    assert client.get(f"{API}/collections/{collection}/index").json()["factory"] == "auto"


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF32,PQ8"])
def test_deleting_an_image_makes_it_unfindable_at_once(
    client: TestClient, collection: str, seeded: np.ndarray, factory: str
) -> None:
    set_kind(client, collection, factory=factory)
    target = int(seeded[7])
    neighbours = similar(client, collection, target, nprobe=32)
    assert target in similar(client, collection, neighbours[0], k=50, nprobe=32)

    assert client.delete(f"{API}/images/{target}").status_code == 204

    for neighbour in neighbours:
        assert target not in similar(client, collection, neighbour, k=50, nprobe=32)
    assert client.get(f"{API}/collections/{collection}/index").json()["ntotal"] == len(seeded) - 1


def test_filters_label_in_a_list_and_metadata_return_only_matching_and_the_exact_top_k(
    client: TestClient, collection: str, seeded: np.ndarray, vectors: np.ndarray
) -> None:
    query = int(seeded[0])
    hits = similar(client, collection, query, label=["3", "4"], meta="part:even")

    ids = np.asarray(seeded)
    match = np.isin(np.arange(len(ids)) % 10, [4])  # even parts among labels 3 and 4: label 4 only
    truth = ids[match][exact_knn(vectors[:1], vectors[match], 10)[0]]
    assert hits == truth.tolist()


def test_filter_by_creation_date(client: TestClient, collection: str, vectors: np.ndarray) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    stamps = [old + timedelta(days=i) for i in range(40)]
    ids = seed_rows(client, collection, vectors[:40], created_at=stamps)

    hits = similar(client, collection, int(ids[0]), created_after="2020-01-30", k=50)
    zoned = similar(client, collection, int(ids[0]), created_after="2020-01-30T02:00:00+02:00", k=50)

    assert sorted(hits) == sorted(int(i) for i in ids[30:])  # after the 30th, 00:00 UTC
    assert zoned == hits
    browse = client.get(f"{API}/collections/{collection}/images", params={"created_after": "2020-02-08Z"})
    assert browse.headers["X-Total-Count"] == "1"


@pytest.mark.parametrize(
    "params",
    [{"created_after": "yesterday"}, {"created_after": "2020-13-01"}, {"label": ["x" * 300, "y"]}],
)
def test_bad_filters_are_a_422(client: TestClient, collection: str, seeded: np.ndarray, params: dict):
    assert_problem(
        client.get(f"{API}/collections/{collection}/images/{int(seeded[0])}/similar", params=params), 422
    )


def test_large_filtered_set_goes_through_the_index_with_a_selector(
    client: TestClient, collection: str, seeded: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.search import query as search

    monkeypatch.setattr(search, "EXACT_PASS_MAX", 10)
    set_kind(client, collection, factory="HNSW32")

    hits = similar(client, collection, int(seeded[0]), label=["1", "2"])

    labels = {int(i): str(n % 10) for n, i in enumerate(seeded)}
    assert len(hits) == 10 and {labels[h] for h in hits} <= {"1", "2"}


# --- consistency across restarts -----------------------------------------------------------


@pytest.fixture
def background_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"index_sync_rebuild_max": 0})


@pytest.fixture
def running(background_settings: Settings) -> Callable[[], Iterator[TestClient]]:
    def run() -> Iterator[TestClient]:
        with TestClient(create_app(background_settings), raise_server_exceptions=False) as client:
            yield client

    return run


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_index_file_is_rebuilt_and_searches_meanwhile_are_503(
    background_settings: Settings, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    with TestClient(create_app(background_settings)) as client:
        client.post(f"{API}/collections", json={"name": "big", "embedder": "tiny"})
        ids = seed_rows(client, "big", clustered(500))
    (path,) = background_settings.index_dir.glob("collection-*.cbidx")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        path.unlink()

    gate = threading.Event()
    real = builds.load_vectors

    def held(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        gate.wait(30)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builds, "load_vectors", held)
    with TestClient(create_app(background_settings), raise_server_exceptions=False) as client:
        during = client.get(f"{API}/collections/big/images/{int(ids[0])}/similar")
        state = client.get(f"{API}/collections/big/index").json()["state"]
        gate.set()
        assert context_of(client).indexes.wait_for_build(record_of(context_of(client), "big").id, timeout=60)
        after = client.get(f"{API}/collections/big/images/{int(ids[0])}/similar")

    body = assert_problem(during, 503, "index_rebuilding")
    assert during.headers["Retry-After"] and "retry" in body["detail"]
    assert state == "building"
    assert after.status_code == 200 and len(after.json()["hits"]) == 10
    assert VectorIndex.load(path).ntotal == len(ids)


def test_a_stale_file_is_caught_up_by_replaying_what_is_missing(settings: Settings, tmp_path) -> None:
    with TestClient(create_app(settings)) as client:
        client.post(f"{API}/collections", json={"name": "grow", "embedder": "tiny"})
        first = seed_rows(client, "grow", clustered(300))
    (path,) = settings.index_dir.glob("collection-*.cbidx")
    saved = path.read_bytes()
    stamp = VectorIndex.load(path).meta["built_at"]
    with TestClient(create_app(settings)) as client:
        second = seed_rows(client, "grow", clustered(30, seed=5), tag="second")
        assert client.delete(f"{API}/images/{int(first[0])}").status_code == 204
    path.write_bytes(saved)  # the last checkpoints lost

    with TestClient(create_app(settings)) as client:
        index = context_of(client).indexes.get(record_of(context_of(client), "grow"))
        assert index is not None
        assert index.meta["built_at"] == stamp  # replayed into, not rebuilt
        assert index.contains(int(second[-1])) and not index.contains(int(first[0]))
        assert index.ntotal == 300 + 30 - 1
