"""Switching a collection to another embedder: a job, search on the old vectors until it is done."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.catalog.collections import create_collection, get_collection, require_collection
from app.context import AppContext
from app.data.vector_rows import load_vectors
from app.ingest import jobs
from app.ingest.sources.folder import check_folder
from app.ingest.store import add_image
from app.learning.job_kinds import job_runner
from app.learning.reembed import check_reembed
from tests.api.helpers import assert_problem

API = "/api/v1"


def _fill(ctx: AppContext, make_png: Callable[..., bytes], n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        add_image(ctx, collection="c", data=make_png(i, size=(16, 16)), name=f"{i}.png", metadata={})


def _versions(ctx: AppContext) -> set[str]:
    from sqlalchemy import select

    from app.data.records import EmbeddingRecord, ImageRecord

    with ctx.db.session() as session:
        record = require_collection(session, "c")
        return set(
            session.scalars(
                select(EmbeddingRecord.embedder_version)
                .join(ImageRecord, ImageRecord.id == EmbeddingRecord.image_id)
                .where(ImageRecord.collection_id == record.id)
                .distinct()
            )
        )


def test_reembed_switches_every_vector_and_the_index(ctx: AppContext, make_png: Callable[..., bytes]) -> None:
    create_collection(ctx, name="c", embedder="tiny")
    _fill(ctx, make_png, 30)
    old = get_collection(ctx, "c")
    spec, model = check_reembed(ctx, collection="c", embedder="pixels")
    runner = job_runner(ctx)
    job_id = runner.create_reembed_job(collection="c", spec=spec)
    seen_old_version_during_job: list[str | None] = []

    def during() -> None:
        seen_old_version_during_job.append(get_collection(ctx, "c").embedder_version)

    runner.run_reembed(job_id=job_id, collection="c", spec=spec, on_progress=during)
    record = jobs.get_job(ctx, job_id).record
    assert (record.state, record.kind, record.done, record.total) == ("succeeded", "reembed", 30, 30)
    assert set(seen_old_version_during_job) == {old.embedder_version}  # search kept the old vectors
    info = get_collection(ctx, "c")
    assert info.embedder == "pixels" and info.embedder_version == model.version
    assert info.image_count == info.index_size == 30
    assert _versions(ctx) == {model.version}  # old vectors dropped, nothing mixed
    with ctx.db.session() as session:
        c = require_collection(session, "c")
    vectors, ids = load_vectors(ctx.db, collection_id=c.id, embedder_version=model.version)
    assert vectors.shape == (30, model.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_an_interrupted_reembed_resumes_and_embeds_nothing_twice(
    ctx: AppContext, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.learning.reembed as reembed

    monkeypatch.setattr(reembed, "BATCH", 8)
    create_collection(ctx, name="c", embedder="tiny")
    _fill(ctx, make_png, 20)
    spec, model = check_reembed(ctx, collection="c", embedder="pixels")
    runner = job_runner(ctx)
    job_id = runner.create_reembed_job(collection="c", spec=spec)
    calls = {"n": 0}

    def stop_after_one_batch() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            runner._stopping.set()  # a shutdown: the job stays running

    runner.run_reembed(job_id=job_id, collection="c", spec=spec, on_progress=stop_after_one_batch)
    record = jobs.get_job(ctx, job_id).record
    assert record.state == "running" and record.done == 8
    assert get_collection(ctx, "c").embedder == "tiny"
    _fill(ctx, make_png, 3, start=100)  # uploads while it is interrupted: embedded at the switch

    fresh = job_runner(ctx)
    assert fresh.recover() == 1
    fresh._executor.shutdown(wait=True)
    record = jobs.get_job(ctx, job_id).record
    assert (record.state, record.resumes) == ("succeeded", 1)
    assert record.done == 20 + 3 and record.total == 20 + 3  # 12 left + 3 new, after the first 8
    info = get_collection(ctx, "c")
    assert (info.embedder, info.image_count, info.index_size) == ("pixels", 23, 23)
    assert _versions(ctx) == {model.version}


def test_reembed_refusals(ctx: AppContext, make_png: Callable[..., bytes]) -> None:
    from app.core.errors import CbirError

    create_collection(ctx, name="c", embedder="tiny")
    with pytest.raises(CbirError) as same:
        check_reembed(ctx, collection="c", embedder="tiny")
    assert same.value.status == 409
    with pytest.raises(CbirError) as trainable:
        check_reembed(ctx, collection="c", embedder="cdae")
    assert trainable.value.status == 422
    with pytest.raises(CbirError) as unknown:
        check_reembed(ctx, collection="c", embedder="nonsense")
    assert unknown.value.status == 422


def test_put_embedder_over_http(client: TestClient, make_png: Callable[..., bytes]) -> None:
    assert client.post(f"{API}/collections", json={"name": "c", "embedder": "tiny"}).status_code == 201
    for i in range(5):
        client.post(f"{API}/collections/c/images", files={"file": (f"{i}.png", make_png(i))})
    response = client.put(f"{API}/collections/c/embedder", json={"embedder": "pixels"})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    import time

    deadline = time.monotonic() + 60
    while (job := client.get(f"{API}/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job["state"] == "succeeded" and job["kind"] == "reembed" and job["done"] == 5
    body = client.get(f"{API}/collections/c").json()
    assert body["embedder"] == "pixels" and body["index_size"] == 5
    assert_problem(
        client.put(f"{API}/collections/c/embedder", json={"embedder": "pixels"}), 409, "already_serving"
    )
    assert_problem(
        client.put(f"{API}/collections/c/embedder", json={"embedder": "cdae"}), 422, "invalid_request"
    )
    assert_problem(
        client.put(f"{API}/collections/nope/embedder", json={"embedder": "pixels"}),
        404,
        "collection_not_found",
    )


def test_a_version_switch_during_an_import_leaves_no_vector_of_the_old_version(
    ctx: AppContext, tmp_path, make_png: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whitening (a new embedder version) lands between two batches of an import: the chunks
    already embedded with the old version are embedded again before they are stored."""
    import app.ingest.pipeline as pipeline
    from app.learning.tuning import whiten_collection

    monkeypatch.setattr(pipeline, "CHUNK_ITEMS", 8)
    create_collection(ctx, name="c", embedder="tiny")
    _fill(ctx, make_png, 10, start=1000)  # something to fit the whitening on
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(120):
        (folder / f"{i:03d}.png").write_bytes(make_png(i, size=(16, 16)))
    settings = ctx.settings.model_copy(update={"import_batch_size": 16})
    ctx.settings = settings
    runner = job_runner(ctx)
    source = check_folder(folder)
    job_id = runner.create_job(collection="c", source=source)
    switched: list[bool] = []

    def whiten_once(counts: dict[str, int], total: int | None) -> None:
        if not switched:
            whiten_collection(ctx, collection="c", dim=4, shrinkage=0.5)
            switched.append(True)

    runner.run_import(job_id=job_id, collection="c", source=source, on_progress=whiten_once)
    record = jobs.get_job(ctx, job_id).record
    assert record.state == "succeeded", record.error
    info = get_collection(ctx, "c")
    assert info.image_count == info.index_size == 130
    assert _versions(ctx) == {info.embedder_version}
    with ctx.db.session() as session:
        c = require_collection(session, "c")
    vectors, _ = load_vectors(ctx.db, collection_id=c.id, embedder_version=c.embedder_version)
    assert vectors.shape == (130, 4)
