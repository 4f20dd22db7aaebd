"""The import pipeline with its worker processes (the default on a multi-core CPU)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.catalog.collections import create_collection, get_collection
from app.context import open_context
from app.core.settings import Settings
from app.data.vector_rows import load_vectors
from app.ingest import jobs, pipeline, stages
from app.ingest.sources.folder import check_folder
from app.ingest.store import add_image


@pytest.fixture
def process_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"import_processes": True, "import_workers": 1})


def _folder(tmp_path: Path, make_png: Callable[..., bytes], n: int) -> Path:
    folder = tmp_path / "images"
    for i in range(n):
        (folder / str(i % 3)).mkdir(parents=True, exist_ok=True)
        (folder / str(i % 3) / f"{i:03d}.png").write_bytes(make_png(i, size=(20, 20)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return folder


def test_worker_processes_give_the_vectors_an_upload_gives(
    process_settings: Settings, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    ctx = open_context(process_settings)
    try:
        assert pipeline.use_processes(ctx) == ((os.cpu_count() or 1) >= 2)
        create_collection(ctx, name="p", embedder="tiny")
        create_collection(ctx, name="q", embedder="tiny")
        folder = _folder(tmp_path, make_png, 40)
        runner = jobs.JobRunner(ctx)
        source = check_folder(folder)
        job_id = runner.create_job(collection="p", source=source)
        runner.run_import(job_id=job_id, collection="p", source=source)
        record = jobs.get_job(ctx, job_id).record
        assert (record.state, record.added, record.failed) == ("succeeded", 40, 1)
        assert record.errors[0]["item"] == "broken.png"
        # The same bytes uploaded one by one (decoded and embedded in this process).
        for path in sorted(folder.rglob("*.png"))[:5]:
            if path.name != "broken.png":
                add_image(ctx, collection="q", data=path.read_bytes(), name=path.name, metadata={})
        info_p = get_collection(ctx, "p")
        assert info_p.image_count == info_p.index_size == 40
        with ctx.db.session() as session:
            from app.catalog.collections import require_collection

            p, q = require_collection(session, "p"), require_collection(session, "q")
        vectors_p, _ = load_vectors(ctx.db, collection_id=p.id, embedder_version=p.embedder_version)
        vectors_q, _ = load_vectors(ctx.db, collection_id=q.id, embedder_version=q.embedder_version)
        # every uploaded vector is (to float precision) one of the imported ones
        similarity = vectors_q @ vectors_p.T
        assert np.allclose(similarity.max(axis=1), 1.0, atol=1e-5)
    finally:
        ctx.close()


def test_a_worker_killed_mid_import_costs_nothing(
    process_settings: Settings,
    tmp_path: Path,
    make_png: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("worker processes are used on two cores or more")
    monkeypatch.setattr(pipeline, "CHUNK_ITEMS", 8)  # chunks still to submit after the kill
    ctx = open_context(process_settings.model_copy(update={"import_batch_size": 16}))
    try:
        create_collection(ctx, name="p", embedder="tiny")
        folder = _folder(tmp_path, make_png, 300)
        runner = jobs.JobRunner(ctx)
        source = check_folder(folder)
        job_id = runner.create_job(collection="p", source=source)
        killed: list[int] = []

        def kill_a_worker(counts: dict[str, int], total: int | None) -> None:
            if not killed:
                for pool in ctx.workers.process_pools:
                    for pid in list(pool._processes):  # noqa: SLF001 - the test's whole point
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)

        runner.run_import(job_id=job_id, collection="p", source=source, on_progress=kill_a_worker)
        record = jobs.get_job(ctx, job_id).record
        assert killed
        assert (record.state, record.added, record.failed) == ("succeeded", 300, 1)
        info = get_collection(ctx, "p")
        assert info.image_count == info.index_size == 300
    finally:
        ctx.close()


def test_an_idle_worker_killed_between_jobs_is_replaced(
    process_settings: Settings, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("worker processes are used on two cores or more")
    ctx = open_context(process_settings)
    try:
        create_collection(ctx, name="p", embedder="tiny")
        runner = jobs.JobRunner(ctx)
        for round_ in range(2):
            folder = tmp_path / f"round{round_}"
            folder.mkdir()
            for i in range(20):
                (folder / f"{i}.png").write_bytes(make_png(1000 * round_ + i, size=(12, 12)))
            source = check_folder(folder)
            job_id = runner.create_job(collection="p", source=source)
            runner.run_import(job_id=job_id, collection="p", source=source)
            assert jobs.get_job(ctx, job_id).record.state == "succeeded"
            for pool in ctx.workers.process_pools:  # the OOM killer, between two jobs
                for pid in list(pool._processes):  # noqa: SLF001
                    os.kill(pid, signal.SIGKILL)
        assert get_collection(ctx, "p").image_count == 40
    finally:
        ctx.close()


def test_pretrained_cnns_import_on_threads_in_this_process(process_settings: Settings) -> None:
    """Worker processes only where per-image work is mostly Python: a pretrained CNN (GIL-free
    forward passes and JPEG decoding) embeds here, sparing a second torch runtime."""
    ctx = open_context(process_settings)
    try:
        create_collection(ctx, name="photos", embedder="efficientnet_lite0")
        create_collection(ctx, name="digits", embedder="tiny")
        many_cores = (os.cpu_count() or 1) >= 2
        assert pipeline.use_processes(ctx, stages.resolve_target(ctx, "photos")) is False
        assert pipeline.use_processes(ctx, stages.resolve_target(ctx, "digits")) is many_cores
    finally:
        ctx.close()


def test_forward_passes_hold_about_4_mb_of_input() -> None:
    import torch

    photo = [torch.zeros(3, 224, 224)]  # 588 KiB as float32
    assert stages.forward_batch(photo, limit=256) == 6
    assert stages.forward_batch([torch.zeros(3, 288, 288)] * 2, limit=256) == 2  # two views each
    assert stages.forward_batch(np.zeros((1, 28, 28), np.float32), limit=256) == 256  # digits: full batches
    assert stages.forward_batch([torch.zeros(3, 4096, 4096)], limit=256) == 1
