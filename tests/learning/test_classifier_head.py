"""`cbir train classifier --arch head`: a projection trained on a frozen pretrained CNN's codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.catalog.collections import create_collection, get_collection
from app.context import AppContext
from app.core.errors import IndexMismatch, InvalidRequest
from app.data.records import CheckpointRecord, ImageRecord
from app.ingest.store import Item, ingest_batch
from app.learning.classifier import train_classifier
from app.search.query import search_by_image
from models import registry
from models.head import HeadEmbedder
from tests.holidays import holidays_subset

BASE = "efficientnet_lite0:pooling=avg,sizes=128"  # the whole image, small to keep it fast
GROUPS = (1000, 1001, 1002, 1003, 1004, 1005)  # not 1031/1039: byte-identical photos


@pytest.fixture
def photos(ctx: AppContext, tmp_path: Path) -> Path:
    """The Holidays subset in a collection "photos" of BASE, labelled by group id."""
    folder = tmp_path / "photos"
    holidays_subset(folder, GROUPS)
    create_collection(ctx, name="photos", embedder=BASE)
    items = [
        Item(path.name, path.read_bytes(), {"label": str(int(path.name[:4]))})
        for path in sorted(folder.glob("*.jpg"))
    ]
    assert {r.status for r in ingest_batch(ctx, collection="photos", items=items)} == {"added"}
    return folder


def test_head_on_a_pretrained_collection_serves_its_projection(ctx: AppContext, photos: Path) -> None:
    base_version = get_collection(ctx, "photos").embedder_version
    checkpoint = train_classifier(ctx, collection="photos", arch="head", dim=16, epochs=20)
    assert checkpoint.embedder == "cnn_head" and checkpoint.version.startswith("cnn_head-")
    assert checkpoint.config["arch"] == "head" and checkpoint.config["dim"] == 16
    assert checkpoint.config["base"] == BASE and checkpoint.config["base_version"] == base_version
    assert checkpoint.config["classes"] == [str(g) for g in GROUPS]
    assert len(checkpoint.metrics["epoch_losses"]) == 20
    assert checkpoint.metrics["epoch_losses"][-1] < checkpoint.metrics["epoch_losses"][0]

    info = get_collection(ctx, "photos")
    assert (info.embedder, info.embedder_version, info.dim) == ("cnn_head", checkpoint.version, 16)
    assert info.embedded_count == info.index_size == len(list(photos.glob("*.jpg")))

    for path in sorted(photos.glob("*.jpg"))[::4]:
        hits = search_by_image(ctx, collection="photos", data=path.read_bytes(), k=2).hits
        assert hits[0].record.original_name == path.name and hits[0].score >= 0.999
        assert hits[1].record.meta["label"] == str(int(path.name[:4]))  # the nearest other one

    # The embedder contract, through the service's cache: unit float32 rows, deterministic.
    with ctx.db.session() as session:
        record = session.get(CheckpointRecord, checkpoint.id)
    embedder = ctx.embedders.get("cnn_head", record)
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in sorted(photos.glob("*.jpg"))[:2]]
    vectors = embedder.embed(images)
    assert vectors.shape == (2, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(images[:1])[0], vectors[0], atol=1e-5)

    # Retraining a collection that already serves the head trains on its recorded base.
    again = train_classifier(ctx, collection="photos", arch="head", dim=8, epochs=2, seed=1)
    assert again.config["base"] == BASE and get_collection(ctx, "photos").dim == 8


def test_a_head_refuses_another_base_version(ctx: AppContext, photos: Path) -> None:
    checkpoint = train_classifier(ctx, collection="photos", arch="head", dim=16, epochs=2, activate=False)
    path = ctx.settings.data_dir / checkpoint.path
    other = registry.create("efficientnet_lite0:input=whole,sizes=96")
    with pytest.raises(ValueError, match="was trained on .* codes, not"):
        HeadEmbedder(checkpoint=path, base=other)
    assert HeadEmbedder(checkpoint=path).version == checkpoint.version  # its own base: fine

    with ctx.db.transaction() as session:  # the database now points the head at another base
        record = session.get(CheckpointRecord, checkpoint.id)
        assert record is not None
        record.config = {**record.config, "base": "efficientnet_lite0:input=whole,sizes=96"}
    ctx.embedders.clear()
    with ctx.db.session() as session:
        record = session.get(CheckpointRecord, checkpoint.id)
    with pytest.raises(IndexMismatch, match="was trained on"):
        ctx.embedders.get("cnn_head", record)


def test_head_needs_a_pretrained_cnn_collection(ctx: AppContext, photos: Path) -> None:
    create_collection(ctx, name="small", embedder="tiny")
    with ctx.db.session() as session:
        rows = session.scalars(select(ImageRecord).limit(4)).all()
    items = [
        Item(f"{i}.jpg", ctx.store.read(r.sha256, r.format), {"label": str(i % 2)})
        for i, r in enumerate(rows)
    ]
    ingest_batch(ctx, collection="small", items=items)
    with pytest.raises(InvalidRequest, match="pretrained CNN"):
        train_classifier(ctx, collection="small", arch="head", epochs=1)
    with pytest.raises(InvalidRequest, match="--dim applies"):
        train_classifier(ctx, collection="photos", arch="lenet5", dim=16)
    assert get_collection(ctx, "small").embedder == "tiny"


def test_head_on_an_unlabelled_collection_is_refused(ctx: AppContext, photos: Path) -> None:
    create_collection(ctx, name="plain", embedder=BASE)
    with ctx.db.session() as session:
        rows = session.scalars(select(ImageRecord).limit(3)).all()
    ingest_batch(
        ctx,
        collection="plain",
        items=[Item(r.original_name, ctx.store.read(r.sha256, r.format)) for r in rows],
    )
    with pytest.raises(InvalidRequest, match="has no labels"):
        train_classifier(ctx, collection="plain", arch="head", epochs=1)
