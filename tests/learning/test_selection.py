"""The embedder selection on a collection's own held-out labels (docs/selection.md)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from app.catalog.collections import create_collection, get_collection, require_collection
from app.context import AppContext
from app.data.records import CheckpointRecord
from app.ingest.sources.datasets import load_mnist
from app.ingest.store import Item, ingest_batch
from app.learning import candidates
from app.learning.candidates import (
    PCA,
    PIXELS,
    UNVALIDATED,
    Fitted,
    budget_epochs,
    cdae_candidate,
    score,
    select_embedder,
    split_held_out,
)
from app.learning.selection import select_and_train
from app.learning.training import train_cdae
from app.search.query import search_by_image


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def mnist(ctx: AppContext, count: int, *, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(
        "train", datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir
    )
    return images[offset : offset + count], labels[offset : offset + count].astype(np.int64)


def store(ctx: AppContext, *, name: str, images: np.ndarray, labels: np.ndarray | None) -> None:
    create_collection(ctx, name=name, embedder="cdae")
    items = [
        Item(f"d{i}.png", png(images[i]), {} if labels is None else {"label": str(labels[i])})
        for i in range(len(images))
    ]
    assert {r.status for r in ingest_batch(ctx, collection=name, items=items)} == {"added"}


def test_held_out_split_is_stratified_capped_and_never_in_the_database() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5 + [-1] * 7)  # label 2 is too small to query
    split = split_held_out(labels, held_fraction=0.1, max_held=6, seed=0)
    assert split is not None
    # 10%: 5 and 3 queries, 8 > 6, so each is scaled by 6/8 and rounded down: 3 and 2
    assert sorted(labels[split.held].tolist()) == [0, 0, 0, 1, 1]
    assert not set(split.held) & set(split.pool)
    assert set(split.database) == {i for i in split.pool if labels[i] >= 0}  # label 2 stays in the db
    assert len(split.pool) == len(labels) - 5
    assert split_held_out(np.array([0] * 50 + [1] * 9), held_fraction=0.1, max_held=10, seed=0) is None
    small = split_held_out(
        np.array([0] * 50 + [1] * 9), held_fraction=0.1, max_held=10, seed=0, min_per_class=5
    )
    assert small is not None and len(small.held) == 6  # 5 of label 0, 1 of label 1


def test_raw_pixels_beat_a_one_step_cdae_and_are_chosen_on_real_digits(ctx: AppContext) -> None:
    """400 real digits: a CDAE trained for one epoch on them is clearly worse than raw pixels."""
    images, labels = mnist(ctx, 400)
    chosen = select_embedder(
        images, labels, candidates=[PIXELS, cdae_candidate("tutorial")], screen_epochs=1, full_epochs=1
    )
    rows = {(r["name"], r["stage"]): r for r in chosen.table}
    assert set(rows) == {("pixels", "baseline"), ("cdae-tutorial", "screen"), ("cdae-tutorial", "full")}
    assert score(rows["pixels", "baseline"]) > score(rows["cdae-tutorial", "full"]) + 0.05
    assert chosen.winner == "pixels" and chosen.validated and rows["pixels", "baseline"]["chosen"]
    assert chosen.held_out + chosen.database == 400 and 35 <= chosen.held_out <= 45  # 10% of each digit
    codes = chosen.encode(images[:3])
    assert codes.shape == (3, 784) and codes.dtype == np.float32
    assert np.allclose(np.linalg.norm(codes, axis=1), 1, atol=1e-5)


def test_selection_activates_the_best_candidate_and_records_its_table(ctx: AppContext) -> None:
    images, labels = mnist(ctx, 400)
    store(ctx, name="digits", images=images, labels=labels)
    outcome = select_and_train(ctx, collection="digits", epochs=1, screen_images=400, screen_epochs=1)
    table = outcome.selection.table
    assert [(r["name"], r["stage"]) for r in table] == [
        ("pixels", "baseline"),
        ("pca64", "baseline"),
        ("cdae-default", "screen"),
        ("cdae-strokes", "screen"),
        ("lenet5", "screen"),
        (outcome.selection.table[-1]["name"], "full"),
    ]
    best = max((r for r in table if r["stage"] != "screen"), key=score)
    assert [r for r in table if r["chosen"]] == [best]
    assert outcome.selection.winner == best["name"]

    info = get_collection(ctx, "digits")
    assert info.ready and info.checkpoint is not None and info.checkpoint["id"] == outcome.checkpoint.id
    recorded = info.checkpoint["metrics"]["selection"]
    assert recorded["validated"] is True and recorded["winner"] == best["name"]
    assert recorded["held_out"] + recorded["database"] == 400
    assert [r["name"] for r in recorded["table"]] == [r["name"] for r in table]
    assert next(r for r in recorded["table"] if r["chosen"])["checkpoint_id"] == outcome.checkpoint.id
    # Every learned model is kept as a checkpoint; the baselines cost nothing to recompute.
    with ctx.db.session() as session:
        kept = session.scalars(select(CheckpointRecord).order_by(CheckpointRecord.id)).all()
    assert len(kept) == 4 + (best["kind"] == "baseline")
    assert {c.id for c in kept} == set(outcome.checkpoints)
    for row in recorded["table"]:
        assert (row.get("checkpoint_id") is not None) == (row["kind"] != "baseline" or row["chosen"])

    # The served codes are the winner's: a stored digit finds itself first.
    result = search_by_image(ctx, collection="digits", data=png(images[7]), k=5)
    assert result.hits[0].record.original_name == "d7.png" and result.hits[0].score >= 0.999


def test_an_untrained_winner_is_served_through_the_registry_and_can_be_retrained(
    ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 digits, one epoch: the tutorial CDAE stays below the baselines, so a baseline wins (the
    default CDAE carries the pixels' principal components and may tie them after one epoch)."""
    monkeypatch.setattr(
        candidates, "default_candidates", lambda *, labelled: [PIXELS, PCA, cdae_candidate("tutorial")]
    )
    images, labels = mnist(ctx, 300)
    store(ctx, name="digits", images=images, labels=labels)
    outcome = select_and_train(ctx, collection="digits", epochs=1, screen_images=300, screen_epochs=1)
    assert outcome.selection.winner in {"pixels", "pca64"}, outcome.selection.table
    info = get_collection(ctx, "digits")
    assert info.embedder == "pixels" and (info.embedder_version or "").startswith("pixels-v1+w")
    assert info.whitening is None  # a projection the selection chose, not a whitening to report
    with ctx.db.session() as session:
        record = require_collection(session, "digits")
        served = ctx.embedders.for_collection(record, session.get(CheckpointRecord, record.checkpoint_id))
    codes = served.embed([Image.fromarray(images[0])])
    assert np.allclose(codes, outcome.selection.encode(images[:1]), atol=1e-5)
    # An untrained winner does not lock the collection out of training (a fixed embedder would).
    again = train_cdae(ctx, collection="digits", epochs=1, preset="tutorial")
    assert get_collection(ctx, "digits").embedder_version == again.version


def test_unlabelled_collection_gets_the_default_cdae_not_validated(ctx: AppContext) -> None:
    images, _ = mnist(ctx, 120)
    store(ctx, name="plain", images=images, labels=None)
    outcome = select_and_train(ctx, collection="plain", epochs=1)
    assert outcome.checkpoint.embedder == "cdae" and outcome.checkpoint.config["preset"] == "default"
    info = get_collection(ctx, "plain")
    assert info.ready and info.embedder == "cdae" and info.embedder_version == outcome.checkpoint.version
    recorded = info.checkpoint["metrics"]["selection"]
    assert recorded["validated"] is False and recorded["reason"] == UNVALIDATED
    assert recorded["winner"] == "cdae-default"
    [row] = recorded["table"]
    assert row["p_at_10"] is None and row["chosen"] and row["notes"].startswith("not validated")


def test_the_full_training_budget_cuts_the_recipe_by_the_screening_rate() -> None:
    trial = Fitted(
        "lenet5", "supervised", lambda x: x, epochs=2, images=1000, seconds=10.0
    )  # 5 ms per image-epoch
    assert budget_epochs(trial, images=10_000, recipe=15, budget_s=120) == 2  # 50 s an epoch
    assert budget_epochs(trial, images=10_000, recipe=15, budget_s=10) == 1  # never none
    assert budget_epochs(trial, images=10_000, recipe=15, budget_s=1e6) == 15  # never more than the recipe
