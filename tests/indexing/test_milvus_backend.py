"""The service with its vectors in Milvus (CBIR_VECTOR_STORE=milvus://..., a milvus-lite server on
127.0.0.1): uploads are found, deletes remove, label filters run in Milvus, a restart reconciles
Milvus with the database, and a kind Milvus cannot build is a 422."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.settings import Settings
from app.data.records import CollectionRecord
from app.indexing.store_index import unused_spaces
from app.indexing.store_manager import StoreIndexManager
from app.main import create_app
from index.faiss_store import FaissStore

API = "/api/v1"


@pytest.fixture
def milvus_settings(settings: Settings, milvus_uri: str) -> Settings:
    """The test's settings with vectors in the session's milvus-lite server, under a prefix of its own."""
    return settings.model_copy(
        update={
            "vector_store": milvus_uri.replace("http://", "milvus://"),
            "vector_store_prefix": f"t{uuid.uuid4().hex[:16]}",
        }
    )


def serve(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), raise_server_exceptions=False)


def context_of(client: TestClient) -> AppContext:
    return client.app.state.context  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def milvus_client(milvus_settings: Settings) -> Iterator[TestClient]:
    with serve(milvus_settings) as client:
        yield client


def upload(client: TestClient, data: bytes, label: str) -> int:
    response = client.post(
        f"{API}/collections/shapes/images",
        files={"file": ("x.png", data, "image/png")},
        data={"metadata": json.dumps({"label": label})},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def search(client: TestClient, data: bytes, **params: Any) -> Any:
    return client.post(
        f"{API}/collections/shapes/search",
        params={"k": 5, **params},
        files={"file": ("q.png", data, "image/png")},
    )


def top_ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["hits"]]


def fill(client: TestClient, make_png: Callable[..., bytes], n: int = 8) -> dict[int, tuple[bytes, str]]:
    assert client.post(f"{API}/collections", json={"name": "shapes", "embedder": "tiny"}).status_code == 201
    images = {}
    for seed in range(n):
        data, label = make_png(seed), "ab"[seed % 2]
        images[upload(client, data, label)] = (data, label)
    return images


def test_collection_on_milvus_finds_each_image_first_and_forgets_deleted_ones(
    milvus_client: TestClient, make_png: Callable[..., bytes]
) -> None:
    images = fill(milvus_client, make_png)
    ctx = context_of(milvus_client)
    assert isinstance(ctx.indexes, StoreIndexManager)
    assert ctx.indexes.store.backend == "milvus"

    for image_id, (data, _) in images.items():
        assert top_ids(search(milvus_client, data))[0] == image_id

    gone = next(iter(images))
    assert milvus_client.delete(f"{API}/images/{gone}").status_code == 204
    assert gone not in top_ids(search(milvus_client, images[gone][0], k=8))
    index = milvus_client.get(f"{API}/collections/shapes/index").json()
    assert (index["state"], index["kind"], index["ntotal"]) == ("ready", "Flat", len(images) - 1)


def test_label_filter_runs_in_milvus_and_returns_only_that_label(
    milvus_client: TestClient, make_png: Callable[..., bytes]
) -> None:
    images = fill(milvus_client, make_png)
    query = images[min(images)][0]

    found = top_ids(search(milvus_client, query, k=8, label="b"))
    created_after = top_ids(search(milvus_client, query, k=8, created_after="2000-01-01"))
    future = top_ids(search(milvus_client, query, k=8, created_after="2999-01-01"))

    assert sorted(found) == sorted(i for i, (_, label) in images.items() if label == "b")
    assert sorted(created_after) == sorted(images)
    assert future == []


def test_restart_reconciles_ids_missing_from_milvus_and_strays(
    milvus_settings: Settings, make_png: Callable[..., bytes]
) -> None:
    with serve(milvus_settings) as client:
        images = fill(client, make_png)
        manager = context_of(client).indexes
        assert isinstance(manager, StoreIndexManager)
        space = next(
            s for s in manager.store.spaces() if s.startswith(f"{milvus_settings.vector_store_prefix}_c")
        )
        lost = sorted(images)[:3]
        # Behind the service's back: three vectors lost, one stray id that no row has.
        manager.store.delete(space, lost)
        stray = np.zeros((1, 64), dtype=np.float32)
        stray[0, 0] = 1.0
        manager.store.upsert(space, ids=[10_000], vectors=stray, labels=["a"], created=[0])
        assert manager.store.count(space) == len(images) - 3 + 1

    with serve(milvus_settings) as client:
        for image_id, (data, _) in images.items():
            assert top_ids(search(client, data))[0] == image_id
        manager = context_of(client).indexes
        assert isinstance(manager, StoreIndexManager)
        assert manager.store.list_ids(space).tolist() == sorted(images)


@pytest.mark.parametrize("kind", ["PCA32,Flat", "IVF4,PQ8"])
def test_kind_milvus_cannot_build_is_a_422(
    milvus_client: TestClient, make_png: Callable[..., bytes], kind: str
) -> None:
    fill(milvus_client, make_png, n=2)

    response = milvus_client.put(f"{API}/collections/shapes/index", json={"factory": kind})

    assert response.status_code == 422, response.text
    body = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert body["code"] == "unsupported_index_kind"
    assert "milvus" in body["detail"] and "CBIR_VECTOR_STORE" in body["detail"]


def test_settings_refuse_an_address_that_is_no_vector_store(tmp_path: object) -> None:
    for bad in ("redis://127.0.0.1:6379", "milvus://127.0.0.1", "milvus://h:1/path", "http://h:1?user=x"):
        with pytest.raises(ValueError, match="CBIR_VECTOR_STORE"):
            Settings(vector_store=bad)
    assert Settings(vector_store="").vector_store == "faiss"
    assert Settings(vector_store="milvus://127.0.0.1:19530?token=u:p&db=x").vector_store_backend == "milvus"


# -- two replicas (two apps on one database and one Milvus) ------------------------------------
def manager_of(client: TestClient) -> StoreIndexManager:
    manager = context_of(client).indexes
    assert isinstance(manager, StoreIndexManager)
    return manager


def record_of(client: TestClient, name: str = "shapes") -> CollectionRecord:
    with context_of(client).db.session() as session:
        return require_collection(session, name)


def space_of(manager: StoreIndexManager, settings: Settings) -> str:
    return next(s for s in manager.store.spaces() if s.startswith(f"{settings.vector_store_prefix}_c"))


def test_a_kind_set_by_another_replica_is_served_without_a_restart(
    milvus_settings: Settings, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(milvus_settings) as one, serve(milvus_settings) as two:
        images = fill(one, make_png)
        assert top_ids(search(two, images[min(images)][0]))[0] == min(images)
        assert two.get(f"{API}/collections/shapes/index").json()["kind"] == "Flat"

        def no_reconcile(*args: object, **kwargs: object) -> None:
            raise AssertionError("a kind set elsewhere is read from the store, not reconciled")

        monkeypatch.setattr(manager_of(two), "_open", no_reconcile)
        put = one.put(f"{API}/collections/shapes/index", json={"factory": "HNSW16", "ef_search": 48})
        assert put.status_code == 202, put.text  # rebuilt by this replica

        status = two.get(f"{API}/collections/shapes/index").json()
        assert (status["kind"], status["ntotal"]) == ("HNSW16", len(images))
        assert manager_of(two).get(record_of(two)).search_knobs().ef_search == 48
        for image_id, (data, _) in images.items():
            assert top_ids(search(two, data))[0] == image_id


def test_a_space_dropped_by_another_replica_is_reopened_not_a_500(
    milvus_settings: Settings, make_png: Callable[..., bytes]
) -> None:
    with serve(milvus_settings) as one, serve(milvus_settings) as two:
        images = fill(one, make_png)
        assert top_ids(search(two, images[min(images)][0]))[0] == min(images)
        # Another process drops the space behind both replicas' backs.
        manager_of(one).store.drop(space_of(manager_of(one), milvus_settings))

        for image_id, (data, _) in images.items():
            assert top_ids(search(two, data))[0] == image_id
        status = one.get(f"{API}/collections/shapes/index").json()
        assert (status["state"], status["ntotal"]) == ("ready", len(images))


def test_an_upload_to_a_space_dropped_elsewhere_reconciles_it(
    milvus_settings: Settings, make_png: Callable[..., bytes]
) -> None:
    with serve(milvus_settings) as one, serve(milvus_settings) as two:
        images = fill(one, make_png, n=4)
        manager_of(two).store.drop(space_of(manager_of(two), milvus_settings))

        late = upload(one, make_png(99), "a")

        assert manager_of(one).store.list_ids(space_of(manager_of(one), milvus_settings)).tolist() == sorted(
            [*images, late]
        )


def test_reconcile_and_refresh_on_demand(milvus_settings: Settings, make_png: Callable[..., bytes]) -> None:
    with serve(milvus_settings) as one:
        images = fill(one, make_png)
        manager = manager_of(one)
        record = record_of(one)
        space = space_of(manager, milvus_settings)
        manager.store.delete(space, sorted(images)[:2])
        stray = np.zeros((1, 64), dtype=np.float32)
        stray[0, 0] = 1.0
        manager.store.upsert(space, ids=[10_000], vectors=stray, labels=["a"], created=[0])

        assert manager.reconcile(record) == (2, 1)
        assert manager.reconcile(record) == (0, 0)
        assert manager.store.list_ids(space).tolist() == sorted(images)

        kept = manager.get(record)
        assert kept is not None
        manager.refresh()
        assert manager.get(record) is not kept
        assert top_ids(search(one, images[max(images)][0]))[0] == max(images)


def test_the_milvus_token_is_hidden_from_repr_json_and_messages() -> None:
    settings = Settings(vector_store="milvus://127.0.0.1:19530?token=root:s3cret&db=photos")

    assert settings.vector_store == "milvus://127.0.0.1:19530?token=root:s3cret&db=photos"  # to connect
    for shown in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        json.dumps(settings.model_dump(), default=str, ensure_ascii=False),
    ):
        assert "s3cret" not in shown
        assert "milvus://127.0.0.1:19530?token=…&db=photos" in shown
    assert "s3cret" not in repr(Settings(vector_store="milvus://root:s3cret@127.0.0.1:19530"))
    with pytest.raises(ValueError) as refused:
        Settings(vector_store="milvus://127.0.0.1?token=root:s3cret")
    assert "s3cret" not in str(refused.value)  # neither the message nor the input it echoes


def test_status_answers_never_show_the_milvus_token(
    milvus_settings: Settings, make_png: Callable[..., bytes]
) -> None:
    keyed = milvus_settings.model_copy(
        update={"vector_store": f"{milvus_settings.vector_store}?token=root:s3cret"}
    )
    with serve(keyed) as client:
        fill(client, make_png, n=2)
        for path in (
            f"{API}/health",
            f"{API}/ready",
            f"{API}/collections/shapes/index",
            f"{API}/collections/shapes",
        ):
            response = client.get(path)
            assert response.status_code == 200, (path, response.text)
            assert "s3cret" not in response.text


def test_a_rebuild_fills_a_new_space_while_the_old_one_serves_then_switches(
    milvus_settings: Settings, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(milvus_settings) as one, serve(milvus_settings) as two:
        images = fill(one, make_png)
        assert top_ids(search(two, images[min(images)][0]))[0] == min(images)  # two serves it too
        manager = manager_of(one)
        alias = manager.get(record_of(one)).space  # type: ignore[union-attr]
        before = manager.store.target(alias)
        assert before is not None and before.startswith(f"{alias}_r")
        during: list[tuple[int, list[int], str | None]] = []
        rows = manager._rows

        def rows_then_search(collection: CollectionRecord, ids: np.ndarray) -> Any:
            # Mid-build, in both replicas: the old space answers, whole.
            for client in (one, two):
                response = search(client, images[min(images)][0], k=8)
                during.append((response.status_code, sorted(top_ids(response)), manager.store.target(alias)))
            return rows(collection, ids)

        monkeypatch.setattr(manager, "_rows", rows_then_search)
        put = one.put(f"{API}/collections/shapes/index", json={"factory": "HNSW16"})
        assert put.status_code == 202, put.text

        assert during and all(entry == (200, sorted(images), before) for entry in during)
        after = manager.store.target(alias)
        assert after is not None and after != before and after.startswith(f"{alias}_r")
        assert before not in manager.store.spaces() and manager.store.kind_of(alias) == "HNSW16"
        for image_id, (data, _) in images.items():
            assert top_ids(search(two, data))[0] == image_id


def test_a_space_made_before_aliases_serves_and_is_replaced_by_the_first_rebuild(
    milvus_settings: Settings, make_png: Callable[..., bytes]
) -> None:
    with serve(milvus_settings) as one:
        images = fill(one, make_png, n=4)
        manager = manager_of(one)
        alias = manager.get(record_of(one)).space  # type: ignore[union-attr]
        manager.store.drop(alias)
        manager.store.create(alias, dim=64, kind="Flat")  # a plain space, as older versions made
        manager.refresh()
        assert top_ids(search(one, images[min(images)][0]))[0] == min(images)  # reconciled in place
        assert manager.store.target(alias) is None

        assert one.put(f"{API}/collections/shapes/index", json={"factory": "HNSW16"}).status_code == 202

        assert (manager.store.target(alias) or "").startswith(f"{alias}_r")
        assert manager.store.kind_of(alias) == "HNSW16" and manager.store.count(alias) == len(images)


def test_unused_spaces_are_other_versions_and_old_leftovers_not_a_build_under_way() -> None:
    store = FaissStore()
    space, now_us = "cbir_c1_v2_00000000", time.time_ns() // 1000
    serving, young, old = (
        f"{space}_r{t:x}" for t in (now_us - 10, now_us - 1_000_000, now_us - 7_200_000_000)
    )
    other = "cbir_c1_v1_11111111_r1"
    for name in (serving, young, old, other):
        store.create(name, dim=4)
    store.point(space, serving)

    assert unused_spaces(store, space, store.spaces()) == sorted([old, other])
