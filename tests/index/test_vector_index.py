import os
import threading
from pathlib import Path

import numpy as np
import pytest

from index import IndexCorrupt, VectorIndex, id_checksum

DIM = 16


def unit_vectors(n: int, *, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 rows of unit L2 norm, deterministic per seed."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_index(n: int = 50, *, seed: int = 0, first_id: int = 100) -> VectorIndex:
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    return VectorIndex.build(unit_vectors(n, seed=seed), ids, meta={"collection": "test"})


def test_indexed_vector_finds_itself_first():
    vectors = unit_vectors(50)
    ids = np.arange(100, 150, dtype=np.int64)
    index = VectorIndex.build(vectors, ids)
    scores, found = index.search(vectors, 5)
    assert scores.shape == found.shape == (50, 5)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    np.testing.assert_array_equal(found[:, 0], ids)
    assert (scores[:, 0] >= 0.999).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert index.ntotal == len(index) == 50 and index.dim == DIM
    assert index.factory == "IDMap2,Flat"


def test_factory_without_idmap_is_wrapped():
    assert VectorIndex(DIM, factory="Flat").factory == "IDMap2,Flat"


def test_unknown_factory_is_rejected():
    with pytest.raises(ValueError, match="factory"):
        VectorIndex(DIM, factory="NoSuchIndex42")


def test_remove_drops_ids_and_counts_only_stored_ones():
    index = make_index(10)
    assert index.remove([100, 101, 999]) == 2
    assert index.ntotal == 8
    assert not index.contains(100) and index.contains(102)
    _, found = index.search(unit_vectors(10), 8)
    assert not np.isin(found, [100, 101]).any()
    assert index.remove([]) == 0


def test_add_rejects_duplicate_ids_in_batch():
    index = VectorIndex(DIM)
    with pytest.raises(ValueError, match="duplicate"):
        index.add(unit_vectors(3), [1, 2, 1])
    assert index.ntotal == 0


def test_add_rejects_ids_already_present():
    index = make_index(5)
    with pytest.raises(ValueError, match="already"):
        index.add(unit_vectors(2, seed=1), [200, 101])
    assert index.ntotal == 5 and not index.contains(200)


def test_add_rejects_wrong_dimension():
    index = VectorIndex(DIM)
    with pytest.raises(ValueError, match="dimension"):
        index.add(unit_vectors(2, dim=DIM + 1), [1, 2])
    with pytest.raises(ValueError, match="2-D"):
        index.add(unit_vectors(1)[0], [1])


def test_add_rejects_nan():
    vectors = unit_vectors(3)
    vectors[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        VectorIndex(DIM).add(vectors, [1, 2, 3])


def test_add_rejects_unnormalised_vectors_and_bad_ids():
    index = VectorIndex(DIM)
    with pytest.raises(ValueError, match="normalised"):
        index.add(unit_vectors(2) * 2, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        index.add(unit_vectors(2), [1, -1])
    with pytest.raises(ValueError, match="ids"):
        index.add(unit_vectors(2), [1, 2, 3])


def test_search_with_k_above_ntotal_returns_ntotal_columns():
    index = make_index(3)
    scores, found = index.search(unit_vectors(2, seed=5), 10)
    assert scores.shape == found.shape == (2, 3)
    assert (found >= 0).all() and np.isfinite(scores).all()


def test_search_on_empty_index_returns_zero_columns():
    scores, found = VectorIndex(DIM).search(unit_vectors(4), 5)
    assert scores.shape == found.shape == (4, 0)
    assert scores.dtype == np.float32 and found.dtype == np.int64


def test_search_rejects_bad_k():
    with pytest.raises(ValueError, match="k"):
        make_index(3).search(unit_vectors(1), 0)


def test_save_load_round_trip_gives_identical_results_and_meta(tmp_path: Path):
    index = make_index(40)
    path = tmp_path / "mnist.cbirvix"
    index.save(path)
    loaded = VectorIndex.load(path)
    queries = unit_vectors(7, seed=9)
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.meta == {"collection": "test"}
    assert loaded.factory == index.factory and loaded.dim == index.dim
    assert loaded.id_checksum() == index.id_checksum()
    assert loaded.contains(120)
    # Still writable after loading.
    loaded.add(unit_vectors(1, seed=3), [7])
    assert loaded.ntotal == 41


def test_save_overwrites_and_leaves_no_temp_files(tmp_path: Path):
    path = tmp_path / "idx.cbirvix"
    make_index(5).save(path)
    make_index(8).save(path)
    assert os.listdir(tmp_path) == ["idx.cbirvix"]
    assert VectorIndex.load(path).ntotal == 8


def _corrupt_file(tmp_path: Path, kind: str) -> Path:
    good = tmp_path / "good.cbirvix"
    make_index(20).save(good)
    data = good.read_bytes()
    bad = tmp_path / f"{kind}.cbirvix"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "random":
        bad.write_bytes(np.random.default_rng(1).bytes(len(data)))
    elif kind == "wrong_magic":
        bad.write_bytes(b"NOTANIDX" + data[8:])
    elif kind == "truncated":
        bad.write_bytes(data[: len(data) - 100])
    elif kind == "truncated_header":
        bad.write_bytes(data[:30])
    elif kind == "flipped_payload_byte":
        flipped = bytearray(data)
        flipped[-50] ^= 0xFF
        bad.write_bytes(bytes(flipped))
    elif kind == "flipped_header_byte":
        flipped = bytearray(data)
        flipped[25] ^= 0x01
        bad.write_bytes(bytes(flipped))
    elif kind == "future_version":
        bad.write_bytes(data[:8] + (99).to_bytes(4, "little") + data[12:])
    return bad


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "random",
        "wrong_magic",
        "truncated",
        "truncated_header",
        "flipped_payload_byte",
        "flipped_header_byte",
        "future_version",
    ],
)
def test_load_rejects_damaged_file_as_corrupt(tmp_path: Path, kind: str):
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(_corrupt_file(tmp_path, kind))


def test_id_checksum_depends_on_set_not_order():
    vectors = unit_vectors(6)
    ids = np.array([5, 9, 1, 44, 7, 3], dtype=np.int64)
    order = np.random.default_rng(2).permutation(6)
    a = VectorIndex.build(vectors, ids)
    b = VectorIndex.build(vectors[order], ids[order])
    assert a.id_checksum() == b.id_checksum() == id_checksum(ids[::-1])
    a.remove([44])
    assert a.id_checksum() != b.id_checksum()
    assert a.id_checksum() == id_checksum([5, 9, 1, 7, 3])
    assert VectorIndex(DIM).id_checksum() == id_checksum([])


def test_concurrent_search_and_add_do_not_crash():
    index = make_index(20)
    errors: list[BaseException] = []
    queries = unit_vectors(4, seed=7)

    def searcher() -> None:
        try:
            for _ in range(50):
                scores, found = index.search(queries, 5)
                assert (found >= 0).all() and np.isfinite(scores).all()
        except BaseException as exc:
            errors.append(exc)

    def adder(worker: int) -> None:
        try:
            for batch in range(10):
                start = 1000 + worker * 1000 + batch * 5
                index.add(unit_vectors(5, seed=start), np.arange(start, start + 5))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    threads += [threading.Thread(target=adder, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert index.ntotal == 20 + 2 * 10 * 5


def test_meta_must_be_json_serialisable():
    with pytest.raises(ValueError, match="JSON"):
        VectorIndex(DIM, meta={"bad": object()})


def test_memory_bytes_grows_with_vectors():
    small, large = make_index(5), make_index(50)
    assert 0 < small.memory_bytes() < large.memory_bytes()
    assert large.memory_bytes() >= 50 * DIM * 4


def test_ivf_factory_trains_on_first_batch_and_finds_itself():
    vectors = unit_vectors(200, seed=4)
    index = VectorIndex.build(vectors, np.arange(200), factory="IVF4,Flat")
    assert index.factory == "IDMap2,IVF4,Flat"
    _, found = index.search(vectors[:10], 1)
    assert (found[:, 0] == np.arange(10)).mean() >= 0.5  # nprobe=1: approximate


def test_hnsw_remove_buries_the_id_so_no_search_returns_it(tmp_path: Path):
    vectors = unit_vectors(20)
    index = VectorIndex.build(vectors, np.arange(20), factory="HNSW8")
    assert index.remove([3, 99]) == 1
    assert index.ntotal == 19 and not index.contains(3) and index.tombstones == 1
    _, found = index.search(vectors, 19)
    assert 3 not in found
    _, found = index.search(vectors[3:4], 5, allowed_ids=[3, 4])
    assert found[0].tolist()[:1] == [4] and 3 not in found
    with pytest.raises(ValueError, match="rebuild"):
        index.add(vectors[3:4], [3])
    index.save(tmp_path / "h.cbidx")
    loaded = VectorIndex.load(tmp_path / "h.cbidx")
    assert loaded.tombstones == 1 and loaded.id_checksum() == id_checksum(np.setdiff1d(np.arange(20), [3]))
    assert 3 not in loaded.search(vectors, 19)[1]
