"""Review of issue 15's selection and CDAE schedule: edge cases found wrong, kept fixed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from sqlalchemy import select

from app.catalog.collections import create_collection
from app.context import AppContext
from app.data.records import CheckpointRecord
from app.ingest.sources.datasets import load_mnist
from app.ingest.store import Item, ingest_batch
from app.learning.candidates import PIXELS, classifier_candidate, select_embedder
from app.learning.selection import select_and_train
from app.learning.training import train_cdae
from models import cdae
from models.lenet import LeNetEmbedder


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def digits(ctx: AppContext) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist("train", datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir)


def store(ctx: AppContext, *, name: str, images: np.ndarray, labels: list[str] | None) -> None:
    create_collection(ctx, name=name, embedder="cdae")
    items = [
        Item(f"d{i}.png", png(images[i]), {} if labels is None else {"label": labels[i]})
        for i in range(len(images))
    ]
    assert {r.status for r in ingest_batch(ctx, collection=name, items=items)} == {"added"}


def test_a_supervised_candidate_is_screened_on_labelled_images_when_the_sample_holds_none(
    ctx: AppContext,
) -> None:
    """20 labelled digits among 3,000: the 5 images screened from the pool hold no label (seed 0),
    and LeNet-5 used to be trained on none of them (ValueError)."""
    images, labels = digits(ctx)
    zeros, ones = np.flatnonzero(labels == 0)[:10], np.flatnonzero(labels == 1)[:10]
    rest = np.flatnonzero(labels > 1)[:2980]
    pool = images[np.concatenate([zeros, ones, rest])]
    given = np.array([0] * 10 + [1] * 10 + [-1] * 2980)
    chosen = select_embedder(
        pool,
        given,
        candidates=[PIXELS, classifier_candidate()],
        screen_images=5,
        screen_epochs=1,
        full_epochs=1,
    )
    rows = {(r["name"], r["stage"]): r for r in chosen.table}
    assert chosen.database == 18
    assert rows["lenet5", "screen"]["images"] == 5  # 5 of the 18 labelled images, none held out
    assert rows["lenet5", "full"]["images"] == 18


def test_a_selected_classifier_records_the_collections_label_names(ctx: AppContext) -> None:
    images, labels = digits(ctx)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    names = [words[int(d)] for d in labels[:150]]
    store(ctx, name="words", images=images[:150], labels=names)
    outcome = select_and_train(ctx, collection="words", epochs=1, screen_images=150, screen_epochs=1)
    with ctx.db.session() as session:
        lenet = session.scalars(select(CheckpointRecord).where(CheckpointRecord.embedder == "lenet5")).all()
    assert lenet and {c.id for c in lenet} <= set(outcome.checkpoints)
    for checkpoint in lenet:  # not the label values "0", "1", ... that the selection trained on
        assert checkpoint.config["classes"] == sorted(set(names))
        served = LeNetEmbedder(checkpoint=ctx.settings.data_dir / checkpoint.path)
        assert served.classes == sorted(set(names))


def test_the_default_cdae_alone_trains_the_presets_minimum_steps_on_a_small_collection(
    ctx: AppContext,
) -> None:
    """`cbir train cdae --no-select` (train_cdae) and the selection train the same schedule."""
    images, _ = digits(ctx)
    store(ctx, name="few", images=images[:8], labels=None)
    checkpoint = train_cdae(ctx, collection="few", preset="default", activate=False)
    expected = cdae.epochs_for(cdae.CDAEConfig.preset("default"), images=8)
    assert expected == 1000  # one batch an epoch: 1,000 batches
    assert checkpoint.config["epochs"] == expected
    assert len(checkpoint.metrics["epoch_losses"]) == expected


def test_serving_the_network_codes_again_survives_rows_left_by_an_interrupted_switch(
    ctx: AppContext,
) -> None:
    """autotune's switch back from a whitening stores the network's codes in one transaction and
    switches in the next: a kill in between leaves those rows, and the next switch collided with
    them (unique image and version)."""
    from app.catalog.collections import checkpoint_of, get_collection, require_collection
    from app.ingest.store import store_vectors
    from app.learning import autotune, tuning

    images, _ = digits(ctx)
    create_collection(ctx, name="photos", embedder="tiny")
    items = [Item(f"d{i}.png", png(images[i]), {}) for i in range(30)]
    assert {r.status for r in ingest_batch(ctx, collection="photos", items=items)} == {"added"}
    tuning.whiten_collection(ctx, collection="photos", dim=8)
    base = ctx.embedders.get("tiny")
    with ctx.db.session() as session:
        record = require_collection(session, "photos")
        checkpoint = checkpoint_of(session, record)
    assert record.embedder_version != base.version  # whitened codes served
    raw, ids = tuning.network_codes(ctx, record=record, checkpoint=checkpoint, base=base)
    with ctx.db.transaction() as session:  # what the first transaction of a killed switch left
        store_vectors(session, image_ids=ids, vectors=raw, embedder="tiny", embedder_version=base.version)
    autotune._serve_network_codes(ctx, record=record, base=base, codes=(raw, ids))
    info = get_collection(ctx, "photos")
    assert info.embedder_version == base.version and info.embedded_count == 30 and info.index_size == 30
