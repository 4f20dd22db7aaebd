"""Training the CDAE on a collection's own images, switching versions, evaluating."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from app.catalog.collections import create_collection, get_collection
from app.context import AppContext
from app.core.errors import EmbedderNotReady, InvalidRequest
from app.data.records import EmbeddingRecord
from app.ingest.sources.datasets import load_mnist
from app.ingest.store import Item, add_image, ingest_batch
from app.learning.evaluation import evaluate
from app.learning.training import activate_checkpoint, train_cdae
from app.search.query import search_by_image


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def digits(ctx: AppContext) -> tuple[np.ndarray, np.ndarray]:
    """300 real MNIST training digits stored in a `cdae` collection named "digits"."""
    images, labels = load_mnist(
        "train", datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir
    )
    images, labels = images[:300], labels[:300]
    create_collection(ctx, name="digits", embedder="cdae")
    items = [Item(f"d{i}.png", png(images[i]), {"label": str(labels[i])}) for i in range(len(images))]
    results = ingest_batch(ctx, collection="digits", items=items)
    assert {r.status for r in results} == {"added"}
    return images, labels


def embedding_count(ctx: AppContext) -> int:
    with ctx.db.session() as session:
        return session.scalar(select(func.count()).select_from(EmbeddingRecord)) or 0


def test_untrained_cdae_collection_stores_images_but_refuses_search(ctx: AppContext, digits) -> None:
    images, _ = digits
    info = get_collection(ctx, "digits")
    assert info.image_count == 300 and not info.ready and info.index_size == 0
    assert embedding_count(ctx) == 0
    with pytest.raises(EmbedderNotReady):
        search_by_image(ctx, collection="digits", data=png(images[0]), k=10)


def test_training_activates_a_checkpoint_and_an_indexed_image_finds_itself(ctx: AppContext, digits) -> None:
    images, _ = digits
    checkpoint = train_cdae(ctx, collection="digits", epochs=1, preset="tutorial")
    info = get_collection(ctx, "digits")
    assert info.ready and info.embedder_version == checkpoint.version
    assert info.checkpoint is not None and info.checkpoint["sha256"] == checkpoint.sha256
    assert info.embedded_count == info.index_size == 300
    assert (ctx.settings.data_dir / checkpoint.path).is_file()
    assert len(checkpoint.metrics["epoch_losses"]) == 1

    result = search_by_image(ctx, collection="digits", data=png(images[7]), k=10)
    assert len(result.hits) == 10
    assert result.hits[0].record.original_name == "d7.png"
    assert result.hits[0].score >= 0.999
    assert set(result.timings_ms) == {"decode", "embed", "search", "fetch", "total"}

    # New uploads are embedded with the active checkpoint at once.
    added = add_image(ctx, collection="digits", data=png(255 - images[0]), name="inverted.png", metadata={})
    assert added.status == "added"
    assert get_collection(ctx, "digits").index_size == 301


def test_switching_checkpoints_replaces_the_served_vectors(ctx: AppContext, digits) -> None:
    first = train_cdae(ctx, collection="digits", epochs=1, preset="tutorial", seed=1)
    second = train_cdae(ctx, collection="digits", epochs=1, preset="tutorial", seed=2, activate=False)
    assert get_collection(ctx, "digits").embedder_version == first.version
    activate_checkpoint(ctx, collection="digits", checkpoint_id=second.id)
    info = get_collection(ctx, "digits")
    assert info.embedder_version == second.version != first.version
    # Old vectors are dropped once the new version serves; exactly one vector per image remains.
    assert embedding_count(ctx) == 300 == info.index_size


def test_training_refuses_a_collection_of_another_embedder(ctx: AppContext) -> None:
    create_collection(ctx, name="pix", embedder="tiny")
    with pytest.raises(InvalidRequest, match="not 'cdae'"):
        train_cdae(ctx, collection="pix", epochs=1)


def test_evaluation_reports_the_active_checkpoint_and_comparisons(ctx: AppContext, digits) -> None:
    checkpoint = train_cdae(ctx, collection="digits", epochs=1, preset="tutorial")
    rows = evaluate(ctx, collection="digits", queries="mnist:test", compare=("pixels",), limit=200)
    assert [row["embedder"].split(" ")[0] for row in rows] == [checkpoint.version, "pixels"]
    for row in rows:
        assert row["queries"] == 200 and row["database"] == 300
        for key in ("p_at_10", "map_at_10", "map_all"):
            assert 0.0 <= row[key] <= 1.0
    # Raw pixels on real digits are far better than chance (0.1) even with 300 images.
    assert rows[1]["p_at_10"] > 0.5


def test_evaluation_rejects_unknown_query_sets(ctx: AppContext, digits) -> None:
    with pytest.raises(InvalidRequest, match="unknown query set"):
        evaluate(ctx, collection="digits", queries="cifar:test")
