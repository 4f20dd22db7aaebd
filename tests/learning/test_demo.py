"""`cbir demo` (what `make run` does first): the whole MNIST collection, end to end.

On SQLite the first build is the session's shared one (``demo_build``, ``tests/demo.py``), which
this test copies; on PostgreSQL the demo is built here, in this test's schema, from the first
``PG_TRAIN`` training digits (a datasets folder of its own): the same command end to end on
PostgreSQL, without a second 60,000-digit build in one `make test`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app.cli import main
from app.core.settings import Settings, get_settings
from app.data.db import Database
from app.data.records import CheckpointRecord, JobRecord
from app.ingest.sources.datasets import MNIST_FILES, load_mnist, read_idx
from app.main import create_app
from tests import demo
from tests.conftest import ON_POSTGRES
from tests.ingest.test_sources import write_idx

PG_TRAIN, PG_TEST = 6_000, 1_000

# Imports 60,000 images, screens the candidates and trains the winner an epoch: about 4 minutes on 2
# quiet cores, far more on a loaded one (once per session: the build is shared).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def png(pixels) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def counts(settings: Settings) -> tuple[int, int]:
    db = Database(settings.sqlalchemy_url)
    try:
        with db.session() as session:
            jobs = session.scalar(select(func.count()).select_from(JobRecord)) or 0
            checkpoints = session.scalar(select(func.count()).select_from(CheckpointRecord)) or 0
    finally:
        db.dispose()
    return jobs, checkpoints


def first_digits(source: Path, target: Path) -> Path:
    """A datasets folder whose MNIST holds the first ``PG_TRAIN`` / ``PG_TEST`` digits of ``source``'s."""
    (target / "mnist").mkdir(parents=True)
    for (images, labels), n in zip(MNIST_FILES.values(), (PG_TRAIN, PG_TEST), strict=True):
        for name in (images, labels):
            write_idx(target / "mnist" / f"{name}.gz", read_idx(source / "mnist" / f"{name}.gz")[:n])
    return target


def test_demo_builds_mnist_once_and_serves_top_10(
    tmp_path: Path, settings: Settings, request: pytest.FixtureRequest
) -> None:
    if ON_POSTGRES:
        settings = settings.model_copy(
            update={"datasets_dir": first_digits(settings.datasets_dir, tmp_path / "datasets")}
        )
    stored = PG_TRAIN if ON_POSTGRES else 60_000
    env = {
        "CBIR_DATA_DIR": str(settings.data_dir),
        "CBIR_DATASETS_DIR": str(settings.datasets_dir),
        "CBIR_DATABASE_URL": settings.database_url,
        "CBIR_DEMO_EPOCHS": demo.DEMO_EPOCHS,
    }
    runner = CliRunner()
    get_settings.cache_clear()
    try:
        if ON_POSTGRES:
            first = runner.invoke(main, ["demo"], env=env, catch_exceptions=False)
            assert first.exit_code == 0, first.output
        else:  # the same `cbir demo`, run once for the session in a child process
            demo.copy_data(request.getfixturevalue("demo_build"), settings.data_dir)
        jobs, checkpoints = counts(settings)
        # The selection keeps each learned candidate it trained (three screened, one full).
        assert jobs == 1 and checkpoints >= 1
        get_settings.cache_clear()
        second = runner.invoke(main, ["demo"], env=env, catch_exceptions=False)
        assert second.exit_code == 0, second.output
        assert counts(settings) == (jobs, checkpoints)  # complete already: nothing imported or trained again
    finally:
        get_settings.cache_clear()

    train, _ = load_mnist("train", datasets_dir=settings.datasets_dir, download_dir=tmp_path)
    test, _ = load_mnist("test", datasets_dir=settings.datasets_dir, download_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        info = client.get("/api/v1/collections/mnist").json()
        assert info["image_count"] == info["index_size"] == info["embedded_count"] == stored
        assert info["checkpoint"] is not None
        selection = info["selection"]  # MNIST train has labels: the embedder was chosen on them
        assert selection["validated"] and selection["winner"] in {r["name"] for r in selection["table"]}
        assert info["embedder"] in {"cdae", "lenet5", "pixels"}

        hits = client.post("/api/v1/collections/mnist/search", files={"file": ("q.png", png(test[0]))})
        assert hits.status_code == 200
        assert len(hits.json()["hits"]) == 10

        stored = client.post("/api/v1/collections/mnist/search", files={"file": ("s.png", png(train[123]))})
        top = stored.json()["hits"][0]
        assert top["original_name"] == "mnist-train-00123.png"
        assert top["score"] >= 0.999
    assert os.path.isdir(settings.data_dir / "checkpoints")
