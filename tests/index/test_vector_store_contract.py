"""The vector store contract (index/store.py), run on every backend: FAISS in process and Milvus
(a milvus-lite server in a separate process on 127.0.0.1, started once per test session)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from index.faiss_store import FaissStore
from index.store import Rows, SpaceMissing, UnsupportedKind, VectorStore, Where, reconcile, space_name

DIM = 16
N = 240
LABELS = ["cat", "dog", None, 'say "cheese" \\o/']
T0 = 1_767_225_600_000_000  # 2026-01-01 UTC in microseconds


def unit_rows(n: int, d: int = DIM, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, d))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class Data:
    """N rows: ids 10, 13, 16, ... (not 0..n, so that positions and ids differ), four labels in
    turn, one created time per hour."""

    ids = np.arange(N, dtype=np.int64) * 3 + 10
    vectors = unit_rows(N)
    labels = [LABELS[i % len(LABELS)] for i in range(N)]
    created = T0 + np.arange(N, dtype=np.int64) * 3_600_000_000

    @classmethod
    def rows(cls, ids: np.ndarray) -> Rows:
        pos = np.searchsorted(cls.ids, ids)
        labels = np.empty(len(pos), dtype=object)
        labels[:] = [cls.labels[p] for p in pos]
        return Rows(ids=cls.ids[pos], vectors=cls.vectors[pos], labels=labels, created=cls.created[pos])

    @classmethod
    def exact(cls, query: np.ndarray, mask: np.ndarray, k: int) -> list[int]:
        scores = cls.vectors[mask] @ query
        return [int(i) for i in cls.ids[mask][np.argsort(-scores, kind="stable")[:k]]]


# The milvus-lite server: the session fixture ``milvus_uri`` (tests/milvus_server.py, via tests/conftest.py).
@pytest.fixture(params=["faiss", "milvus"])
def store(request: pytest.FixtureRequest) -> Iterator[VectorStore]:
    if request.param == "faiss":
        made: VectorStore = FaissStore()
    else:
        uri = request.getfixturevalue("milvus_uri")  # skips first when Milvus is not installed
        from index.milvus_store import MilvusStore

        made = MilvusStore(uri)
    yield made
    made.close()


@pytest.fixture
def space(store: VectorStore) -> Iterator[str]:
    name = space_name(collection_id=1, embedder_version=f"test:{uuid.uuid4().hex}")
    yield name
    store.drop(name)


@pytest.fixture
def filled(store: VectorStore, space: str) -> str:
    store.create(space, dim=DIM, kind="Flat")
    store.upsert(space, ids=Data.ids, vectors=Data.vectors, labels=Data.labels, created=Data.created)
    return space


def top1(store: VectorStore, space: str, rows: np.ndarray) -> np.ndarray:
    return store.search(space, Data.vectors[np.searchsorted(Data.ids, rows)], 1)[1][:, 0]


# -- the contract ---------------------------------------------------------------------------------
def test_added_vectors_are_counted_listed_and_their_own_top1(store: VectorStore, filled: str) -> None:
    assert store.exists(filled)
    assert store.count(filled) == N
    assert store.list_ids(filled).tolist() == Data.ids.tolist()
    assert top1(store, filled, Data.ids[:40]).tolist() == Data.ids[:40].tolist()
    scores, ids = store.search(filled, Data.vectors[:3], 5)
    assert scores.shape == ids.shape == (3, 5) and scores.dtype == np.float32 and ids.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-4)


def test_upsert_replaces_the_vector_and_fields_of_a_stored_id(store: VectorStore, filled: str) -> None:
    target, donor = int(Data.ids[5]), int(Data.ids[9])
    store.upsert(filled, ids=[target], vectors=Data.vectors[9:10], labels=["fresh"], created=[T0 - 1])
    assert store.count(filled) == N
    _, ids = store.search(filled, Data.vectors[9:10], 2)
    assert sorted(ids[0].tolist()) == sorted([target, donor])
    _, ids = store.search(filled, Data.vectors[5:6], 1, where=Where(labels=("fresh",)))
    assert ids[0].tolist() == [target]
    _, ids = store.search(filled, Data.vectors[9:10], 3, where=Where(created_until=T0))
    assert ids[0].tolist() == [target, -1, -1]


def test_delete_removes_ids_and_ignores_unknown_ones(store: VectorStore, filled: str) -> None:
    gone = Data.ids[[1, 2, 3]]
    store.delete(filled, [*gone.tolist(), 999_999])
    assert store.count(filled) == N - 3
    assert not np.isin(gone, store.list_ids(filled)).any()
    _, ids = store.search(filled, Data.vectors[1:4], 10)
    assert not np.isin(gone, ids).any()


@pytest.mark.parametrize(
    "where",
    [
        Where(labels=("cat",)),
        Where(labels=(None,)),
        Where(labels=('say "cheese" \\o/', "dog")),
        Where(created_from=T0 + 50 * 3_600_000_000),
        Where(created_from=T0 + 10 * 3_600_000_000, created_until=T0 + 30 * 3_600_000_000),
        Where(labels=("dog",), created_until=T0 + 100 * 3_600_000_000),
    ],
    ids=["label", "no-label", "quoted-label-or-another", "created-from", "created-range", "label-and-date"],
)
def test_search_returns_the_exact_best_among_rows_that_pass_the_filter(
    store: VectorStore, filled: str, where: Where
) -> None:
    labels = np.empty(N, dtype=object)
    labels[:] = Data.labels
    mask = where.matches(labels=labels, created=Data.created)
    query = unit_rows(4, seed=7)
    _, ids = store.search(filled, query, 5, where=where)
    for row in range(len(query)):
        assert ids[row].tolist() == Data.exact(query[row], mask, 5)


def test_search_among_allowed_ids_pads_with_minus_one(store: VectorStore, filled: str) -> None:
    allowed = Data.ids[[4, 8, 15]]
    scores, ids = store.search(filled, Data.vectors[:2], 6, allowed_ids=allowed, where=Where(labels=("cat",)))
    assert sorted(ids[0, :2].tolist()) == sorted(Data.ids[[4, 8]].tolist())  # 15 is a "dog"
    assert ids[:, 2:].tolist() == [[-1] * 4] * 2 and np.isneginf(scores[:, 2:]).all()
    _, ids = store.search(filled, Data.vectors[:1], 3, allowed_ids=[])
    assert ids.tolist() == [[-1, -1, -1]]


def test_reconcile_restores_missing_ids_and_removes_extra_ones(store: VectorStore, filled: str) -> None:
    lost = Data.ids[::8]
    store.delete(filled, lost)  # writes a crash lost
    stray = np.array([5_000_001, 5_000_002], dtype=np.int64)  # rows the database deleted meanwhile
    store.upsert(filled, ids=stray, vectors=unit_rows(2, seed=3))
    assert np.setdiff1d(Data.ids, store.list_ids(filled)).tolist() == lost.tolist()
    done = reconcile(store, filled, db_ids=Data.ids, fetch=Data.rows, batch=7)
    assert (done.added, done.removed) == (lost.size, 2)
    assert store.list_ids(filled).tolist() == Data.ids.tolist()
    assert top1(store, filled, lost).tolist() == lost.tolist()
    _, ids = store.search(filled, Data.vectors[:1], 1, allowed_ids=lost[:1], where=Where(labels=("cat",)))
    assert ids[0].tolist() == [int(lost[0])]  # its label came back with it
    assert reconcile(store, filled, db_ids=Data.ids, fetch=Data.rows) == type(done)(added=0, removed=0)


@pytest.mark.parametrize("kind", ["Flat", "HNSW16", "IVF8,Flat", "IVF8,SQ8"])
def test_every_shared_kind_finds_each_vector_as_its_own_top1(
    store: VectorStore, space: str, kind: str
) -> None:
    store.create(space, dim=DIM, kind=kind)
    store.upsert(space, ids=Data.ids, vectors=Data.vectors, labels=Data.labels, created=Data.created)
    found = top1(store, space, Data.ids)
    assert (found == Data.ids).mean() >= 0.95
    store.delete(space, Data.ids[:10])
    store.upsert(space, ids=Data.ids[:5], vectors=Data.vectors[:5])  # back after a delete (HNSW tombstones)
    assert store.count(space) == N - 5


def test_unsupported_kind_is_refused_before_anything_is_created(store: VectorStore, space: str) -> None:
    refused = ["LSH", "HNSW1", "IVF8,PQ5"]  # no such kind; a crashing graph; 5 does not divide 16
    if store.backend == "milvus":
        refused += ["PCA8,Flat", "IVF8,Flat,RFlat", "HNSW16_SQ8", "IVF8,SQ4", "OPQ4,IVF8,PQ4"]
        if store.server_version.startswith("milvus_lite"):  # type: ignore[attr-defined]
            refused.append("IVF8,PQ4")  # milvus-lite 3.x cannot build IVF_PQ
    for kind in refused:
        with pytest.raises(UnsupportedKind):
            store.check_kind(kind, dim=DIM)
        with pytest.raises(ValueError, match=r"\S"):  # UnsupportedKind is a ValueError: a 422
            store.create(space, dim=DIM, kind=kind)
        assert not store.exists(space)


def test_create_refuses_an_existing_space_and_drop_forgets_it(store: VectorStore, filled: str) -> None:
    with pytest.raises(ValueError, match="exists"):
        store.create(filled, dim=DIM)
    store.drop(filled)
    assert not store.exists(filled)
    store.drop(filled)  # twice is nothing


def test_bad_rows_are_refused_and_nothing_is_stored(store: VectorStore, filled: str) -> None:
    bad: list[Callable[[], None]] = [
        lambda: store.upsert(filled, ids=[1], vectors=Data.vectors[:1] * 2),  # not unit norm
        lambda: store.upsert(filled, ids=[1, 1], vectors=Data.vectors[:2]),
        lambda: store.upsert(filled, ids=[-4], vectors=Data.vectors[:1]),
        lambda: store.upsert(filled, ids=[1], vectors=unit_rows(1, d=DIM + 1)),
        lambda: store.upsert(filled, ids=[1, 2], vectors=Data.vectors[:2], labels=["one"]),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()
    assert store.count(filled) == N


def test_space_names_are_valid_milvus_names_and_differ_per_version() -> None:
    a = space_name(collection_id=3, embedder_version="cdae:v2/ä b")
    b = space_name(collection_id=3, embedder_version="cdae:v2/a_b")
    assert a != b
    for name in (a, b):
        assert name[0].isalpha() and all(c.isalnum() or c == "_" for c in name) and len(name) <= 255


def test_milvus_urls_become_client_arguments() -> None:
    pytest.importorskip("pymilvus", reason="pymilvus is not installed")
    from index.milvus_store import parse_milvus_url

    assert parse_milvus_url("milvus://db.internal:19530") == {"uri": "http://db.internal:19530"}
    assert parse_milvus_url("https://m:443?token=u:p&db=shop") == {
        "uri": "https://m:443",
        "token": "u:p",
        "db_name": "shop",
    }
    with pytest.raises(ValueError):
        parse_milvus_url("postgresql://x")


def test_milvus_replicas_share_one_space(request: pytest.FixtureRequest) -> None:
    """Two clients (two API replicas) on one server: a write through one is seen by the other."""
    uri = request.getfixturevalue("milvus_uri")
    from index.milvus_store import MilvusStore

    one, two = MilvusStore(uri), MilvusStore(uri)
    name = f"cbir_shared_{uuid.uuid4().hex}"
    try:
        one.create(name, dim=DIM)
        one.upsert(name, ids=Data.ids[:20], vectors=Data.vectors[:20])
        assert two.count(name) == 20
        assert two.search(name, Data.vectors[3:4], 1)[1][0].tolist() == [int(Data.ids[3])]
        two.delete(name, Data.ids[:5])
        assert one.list_ids(name).tolist() == Data.ids[5:20].tolist()
    finally:
        one.drop(name)
        one.close()
        two.close()


def test_a_space_that_is_gone_is_space_missing_for_every_call(store: VectorStore, filled: str) -> None:
    store.search(filled, Data.vectors[:1], 1)  # what the client remembers of it (Milvus: dim, kind)
    store.drop(filled)
    calls: list[Callable[[], object]] = [
        lambda: store.search(filled, Data.vectors[:1], 1),
        lambda: store.count(filled),
        lambda: store.list_ids(filled),
        lambda: store.upsert(filled, ids=[1], vectors=Data.vectors[:1]),
        lambda: store.delete(filled, [1]),
        lambda: store.dim_of(filled),
        lambda: store.kind_of(filled),
    ]
    for call in calls:
        with pytest.raises(SpaceMissing):
            call()


def test_milvus_replica_sees_the_kind_and_a_recreated_space_after_forget(
    request: pytest.FixtureRequest,
) -> None:
    """Another replica recreates the space in another kind: a client that read the old kind serves
    it until ``forget``, then reads the new one; a space dropped elsewhere is ``SpaceMissing``."""
    uri = request.getfixturevalue("milvus_uri")
    from index.milvus_store import MilvusStore

    one, two = MilvusStore(uri), MilvusStore(uri)
    name = f"cbir_kinds_{uuid.uuid4().hex}"
    try:
        one.create(name, dim=DIM, kind="HNSW16")
        assert (two.kind_of(name), two.dim_of(name)) == ("HNSW16", DIM)
        one.drop(name)
        one.create(name, dim=DIM, kind="IVF8,Flat")
        assert two.kind_of(name) == "HNSW16"
        two.forget(name)
        assert two.kind_of(name) == "IVF8,Flat"
        one.drop(name)
        with pytest.raises(SpaceMissing):
            two.count(name)
        with pytest.raises(SpaceMissing):
            two.kind_of(name)  # forgotten with the failure
    finally:
        one.drop(name)
        one.close()
        two.close()


def test_an_upsert_that_changes_a_label_moves_the_row_between_filters(
    store: VectorStore, filled: str
) -> None:
    moved = Data.ids[[0, 1]]
    rows = Data.rows(moved)
    store.upsert(filled, ids=moved, vectors=rows.vectors, labels=["bird", None], created=rows.created)
    _, birds = store.search(filled, rows.vectors, 3, where=Where(labels=("bird", "never-seen")))
    assert birds[:, 0].tolist() == [int(moved[0]), int(moved[0])] and (birds[:, 1:] == -1).all()
    _, unlabelled = store.search(filled, rows.vectors[1:], 1, where=Where(labels=(None,)))
    assert unlabelled[0].tolist() == [int(moved[1])]
    _, nothing = store.search(filled, rows.vectors[:1], 2, where=Where(labels=("never-seen",)))
    assert nothing.tolist() == [[-1, -1]]


def test_an_alias_serves_its_space_and_switches_at_once(store: VectorStore, filled: str) -> None:
    alias, other = f"{filled}_alias", f"{filled}_next"
    try:
        assert store.target(alias) is None and store.target(filled) is None
        store.point(alias, filled)
        assert store.target(alias) == filled and store.exists(alias)
        assert (store.count(alias), store.dim_of(alias), store.kind_of(alias)) == (N, DIM, "Flat")
        assert top1(store, alias, Data.ids[:5]).tolist() == Data.ids[:5].tolist()

        store.create(other, dim=DIM, kind="HNSW16")
        store.upsert(other, ids=Data.ids[:3], vectors=Data.vectors[:3])
        store.point(alias, other)  # a rebuilt space takes over
        assert store.target(alias) == other and store.count(alias) == 3
        store.upsert(alias, ids=Data.ids[3:4], vectors=Data.vectors[3:4])
        assert store.list_ids(other).tolist() == Data.ids[:4].tolist()
        assert alias not in store.spaces()

        with pytest.raises(ValueError):
            store.point(filled, other)  # a space's own name is no alias
        with pytest.raises(SpaceMissing):
            store.point(alias, f"{filled}_never")

        store.drop(alias)  # the alias and the space it names
        assert not store.exists(alias) and not store.exists(other) and store.exists(filled)
        store.point(alias, filled)
        store.drop(filled)  # a space's aliases go with it
        assert not store.exists(alias) and store.target(alias) is None
    finally:
        store.drop(alias)
        store.drop(other)
