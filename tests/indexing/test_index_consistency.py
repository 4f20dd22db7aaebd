"""The database is the truth, the index file a cache: after any restart search finds exactly the rows.

Each test runs the app more than once on the same settings (same data folder and database), as a
restarted service would, and damages the index file in between.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.context import open_context
from app.core.settings import Settings
from app.ingest.store import Item, ingest_batch
from app.main import create_app
from index import VectorIndex

API = "/api/v1"
COLLECTION = "shapes"


@contextmanager
def running(settings: Settings) -> Iterator[TestClient]:
    """One lifetime of the service: startup (recovery) on enter, shutdown (final checkpoint) on exit."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def upload_all(client: TestClient, images: list[bytes]) -> list[int]:
    ids = []
    for data in images:
        response = client.post(f"{API}/collections/{COLLECTION}/images", files={"file": ("a.png", data)})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def top_hits(client: TestClient, data: bytes, k: int = 5) -> list[tuple[int, float]]:
    response = client.post(
        f"{API}/collections/{COLLECTION}/search", params={"k": k}, files={"file": ("q.png", data)}
    )
    assert response.status_code == 200, response.text
    return [(h["id"], h["score"]) for h in response.json()["hits"]]


def assert_every_image_finds_itself(client: TestClient, images: dict[int, bytes]) -> None:
    info = client.get(f"{API}/collections/{COLLECTION}").json()
    assert info["image_count"] == info["index_size"] == len(images)
    for image_id, data in images.items():
        hits = top_hits(client, data, k=1)
        assert hits[0][0] == image_id and hits[0][1] >= 0.999


def index_file(settings: Settings) -> Path:
    (path,) = settings.index_dir.glob("collection-*.cbidx")
    return path


def start_collection(settings: Settings, images: list[bytes]) -> dict[int, bytes]:
    with running(settings) as client:
        client.post(f"{API}/collections", json={"name": COLLECTION, "embedder": "tiny"})
        ids = upload_all(client, images)
    return dict(zip(ids, images, strict=True))


def test_restart_serves_the_same_results_from_the_saved_index(
    settings: Settings, make_png: Callable[..., bytes]
):
    images = [make_png(seed) for seed in range(10)]
    with running(settings) as client:
        client.post(f"{API}/collections", json={"name": COLLECTION, "embedder": "tiny"})
        ids = upload_all(client, images)
        before = [top_hits(client, data) for data in images]
    saved = index_file(settings)
    stamp = saved.stat().st_mtime_ns

    with running(settings) as client:
        after = [top_hits(client, data) for data in images]
        assert_every_image_finds_itself(client, dict(zip(ids, images, strict=True)))

    assert after == before
    assert saved.stat().st_mtime_ns == stamp  # a consistent file is loaded, not rebuilt


def test_shutdown_checkpoints_the_index(settings: Settings, make_png: Callable[..., bytes]):
    images = start_collection(settings, [make_png(seed) for seed in range(4)])
    index = VectorIndex.load(index_file(settings))
    assert sorted(index.ids().tolist()) == sorted(images)
    assert index.meta["embedder_version"] == "tiny-v1"


def test_missing_index_file_is_rebuilt_from_the_database(settings: Settings, make_png: Callable[..., bytes]):
    images = start_collection(settings, [make_png(seed) for seed in range(8)])
    index_file(settings).unlink()

    with running(settings) as client:
        assert_every_image_finds_itself(client, images)
    assert sorted(VectorIndex.load(index_file(settings)).ids().tolist()) == sorted(images)


def test_garbage_index_file_is_set_aside_and_rebuilt(settings: Settings, make_png: Callable[..., bytes]):
    images = start_collection(settings, [make_png(seed) for seed in range(8)])
    path = index_file(settings)
    garbage = np.random.default_rng(0).bytes(path.stat().st_size)
    path.write_bytes(garbage)

    with running(settings) as client:
        assert_every_image_finds_itself(client, images)
    assert path.with_suffix(".corrupt").read_bytes() == garbage  # kept for a post-mortem
    VectorIndex.load(path)  # the rebuilt file is sound


def test_torn_index_file_is_rebuilt(settings: Settings, make_png: Callable[..., bytes]):
    images = start_collection(settings, [make_png(seed) for seed in range(8)])
    path = index_file(settings)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with running(settings) as client:
        assert_every_image_finds_itself(client, images)


def test_stale_index_missing_later_uploads_is_rebuilt(
    settings: Settings, make_png: Callable[..., bytes], tmp_path: Path
):
    images = start_collection(settings, [make_png(seed) for seed in range(5)])
    old_copy = tmp_path / "old.cbidx"
    shutil.copyfile(index_file(settings), old_copy)
    with running(settings) as client:
        later = [make_png(seed) for seed in range(5, 9)]
        images.update(zip(upload_all(client, later), later, strict=True))
    shutil.copyfile(old_copy, index_file(settings))  # as if the last checkpoints were lost

    with running(settings) as client:
        assert_every_image_finds_itself(client, images)


def test_stale_index_holding_deleted_images_never_returns_them(
    settings: Settings, make_png: Callable[..., bytes], tmp_path: Path
):
    images = start_collection(settings, [make_png(seed) for seed in range(6)])
    old_copy = tmp_path / "old.cbidx"
    shutil.copyfile(index_file(settings), old_copy)
    deleted = list(images)[:2]
    with running(settings) as client:
        for image_id in deleted:
            assert client.delete(f"{API}/images/{image_id}").status_code == 204
    shutil.copyfile(old_copy, index_file(settings))

    with running(settings) as client:
        for image_id in deleted:
            assert image_id not in [i for i, _ in top_hits(client, images[image_id], k=10)]
        assert_every_image_finds_itself(client, {i: d for i, d in images.items() if i not in deleted})


def test_index_built_for_another_embedder_version_is_not_served(
    settings: Settings, make_png: Callable[..., bytes]
):
    images = start_collection(settings, [make_png(seed) for seed in range(6)])
    # Same ids, so only the version (and dimension) tell this file apart.
    vectors = np.random.default_rng(0).standard_normal((len(images), 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    foreign = VectorIndex.build(
        vectors, np.asarray(list(images), dtype=np.int64), meta={"embedder_version": "other-v9"}
    )
    foreign.save(index_file(settings))

    with running(settings) as client:
        assert_every_image_finds_itself(client, images)
    assert VectorIndex.load(index_file(settings)).meta["embedder_version"] == "tiny-v1"


def test_images_uploaded_across_restarts_are_all_found(settings: Settings, make_png: Callable[..., bytes]):
    images = start_collection(settings, [make_png(0)])
    for round_ in range(1, 4):
        with running(settings) as client:
            new = [make_png(10 * round_ + i) for i in range(3)]
            images.update(zip(upload_all(client, new), new, strict=True))
            assert_every_image_finds_itself(client, images)
    with running(settings) as client:
        assert_every_image_finds_itself(client, images)


def test_first_write_of_a_new_process_adds_each_vector_once(
    settings: Settings, make_png: Callable[..., bytes]
):
    # A CLI import opens a bare context: its first index access comes with the first write.
    images = start_collection(settings, [make_png(seed) for seed in range(3)])
    context = open_context(settings)
    try:
        data = [make_png(seed) for seed in range(3, 6)]
        results = ingest_batch(context, collection=COLLECTION, items=[Item(None, d) for d in data])
        assert [r.status for r in results] == ["added"] * 3
        images.update((r.image_id, d) for r, d in zip(results, data, strict=True))
    finally:
        context.close()

    with running(settings) as client:
        assert_every_image_finds_itself(client, images)
