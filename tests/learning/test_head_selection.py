"""`cbir train classifier --arch head` with selection: the head is served only where it beats
the collection's codes on a held-out part of its labels (app/learning/head_selection.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api.presenters import collection_out
from app.catalog.collections import create_collection, get_collection
from app.context import AppContext
from app.data.records import CheckpointRecord, CollectionRecord
from app.data.vector_rows import load_vectors
from app.ingest.store import Item, ingest_batch
from app.learning.candidates import score
from app.learning.classifier import train_classifier
from app.learning.head_selection import MIN_PER_CLASS, head_split
from app.learning.tuning import serve_whitening
from tests.holidays import holidays_subset

BASE = "efficientnet_lite0:pooling=avg,sizes=128"  # the whole image, small to keep it fast
GROUPS = (1000, 1001, 1002, 1003, 1004, 1005)  # not 1031/1039: byte-identical photos


def _ingest(ctx: AppContext, folder: Path, *, name: str, label: bool = True, per_file: bool = False) -> None:
    create_collection(ctx, name=name, embedder=BASE)
    items = [
        Item(path.name, path.read_bytes(), {"label": path.stem if per_file else str(int(path.name[:4]))})
        for path in sorted(folder.glob("*.jpg"))
    ]
    assert {r.status for r in ingest_batch(ctx, collection=name, items=items)} == {"added"}


@pytest.fixture
def photos(ctx: AppContext, tmp_path: Path) -> Path:
    """The Holidays subset (2 to 5 photos per group) in a collection "photos" of BASE, labelled by group."""
    folder = tmp_path / "photos"
    holidays_subset(folder, GROUPS)
    _ingest(ctx, folder, name="photos")
    return folder


def _checkpoint(ctx: AppContext, checkpoint_id: int) -> CheckpointRecord:
    with ctx.db.session() as session:
        record = session.get(CheckpointRecord, checkpoint_id)
    assert record is not None
    return record


def test_the_split_holds_one_photo_of_every_small_group_out() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, -1])  # label 2 has one photo: never a query
    split = head_split(labels, seed=0)
    assert split is not None and MIN_PER_CLASS == 2
    assert sorted(labels[split.held]) == [0, 1, 3]
    assert set(split.database).isdisjoint(split.held) and 11 not in split.database
    assert head_split(np.array([0, 1, 2, 2, -1]), seed=0) is None  # one label with two photos


def test_a_worse_head_is_kept_but_not_activated(ctx: AppContext, photos: Path) -> None:
    before = get_collection(ctx, "photos")
    # One dimension: every code is +1 or -1, far worse than the CNN's codes on six groups.
    checkpoint = train_classifier(ctx, collection="photos", arch="head", dim=1, epochs=2, select=True)
    selection = _checkpoint(ctx, checkpoint.id).metrics["selection"]
    assert selection["validated"] and selection["activated"] is False
    assert selection["winner"] == "cnn" and "not activated" in selection["reason"]
    served, head = selection["table"]
    assert (served["name"], served["chosen"], head["name"], head["chosen"]) == ("cnn", True, "head", False)
    assert score(served) > score(head) + 0.1
    assert head["checkpoint_id"] == checkpoint.id and head["images"] == selection["database"]
    assert (
        selection["held_out"] == len(GROUPS) and selection["held_out"] + head["images"] == before.image_count
    )

    after = get_collection(ctx, "photos")  # still serving the CNN's codes, the table on show
    assert (after.embedder, after.embedder_version) == (before.embedder, before.embedder_version)
    assert after.selection == selection
    out = collection_out(after)
    assert out.selection is not None and out.selection.winner == "cnn"


def test_a_better_head_is_activated_over_poor_served_codes(ctx: AppContext, photos: Path) -> None:
    with ctx.db.session() as session:
        record = session.query(CollectionRecord).filter_by(name="photos").one()
    base = ctx.embedders.get(BASE)
    codes = load_vectors(ctx.db, collection_id=record.id, embedder_version=base.version)
    serve_whitening(ctx, record=record, base=base, codes=codes, dim=1)  # served: one dimension
    whitened = get_collection(ctx, "photos").embedder_version

    checkpoint = train_classifier(ctx, collection="photos", arch="head", dim=16, epochs=20, select=True)
    selection = _checkpoint(ctx, checkpoint.id).metrics["selection"]
    served, head = selection["table"]
    assert served["name"] == "cnn+whiten1" and whitened in served["notes"]  # the stored, whitened codes
    assert head["chosen"] and selection["winner"] == "head" and selection["activated"]
    assert score(head) > score(served) + 0.1
    info = get_collection(ctx, "photos")
    assert (info.embedder, info.embedder_version, info.dim) == ("cnn_head", checkpoint.version, 16)
    assert info.selection == selection


def test_too_few_labels_trains_as_before_and_says_not_validated(ctx: AppContext, tmp_path: Path) -> None:
    folder = tmp_path / "one-each"
    holidays_subset(folder, GROUPS[:2])
    _ingest(ctx, folder, name="singles", per_file=True)  # every photo its own label
    checkpoint = train_classifier(ctx, collection="singles", arch="head", dim=8, epochs=2, select=True)
    selection = _checkpoint(ctx, checkpoint.id).metrics["selection"]
    assert selection["validated"] is False and "fewer than 2 labels have 2" in selection["reason"]
    [row] = selection["table"]
    assert row["p_at_10"] is None and row["images"] == len(list(folder.glob("*.jpg")))
    assert get_collection(ctx, "singles").embedder == "cnn_head"  # activated, as without selection


def test_without_select_the_head_is_activated_unmeasured(ctx: AppContext, photos: Path) -> None:
    checkpoint = train_classifier(ctx, collection="photos", arch="head", dim=1, epochs=2)
    assert "selection" not in _checkpoint(ctx, checkpoint.id).metrics
    assert get_collection(ctx, "photos").embedder == "cnn_head"


def test_the_kept_head_table_is_on_the_api_and_the_evaluate_page(
    ctx: AppContext, photos: Path, client: TestClient
) -> None:
    train_classifier(ctx, collection="photos", arch="head", dim=1, epochs=2, select=True)
    body = client.get("/api/v1/collections/photos").json()
    assert body["embedder"] == BASE and body["selection"]["winner"] == "cnn"
    assert [row["name"] for row in body["selection"]["table"]] == ["cnn", "head"]
    page = client.get("/evaluate", params={"collection": "photos"}).text
    assert 'id="selection"' in page and "not activated" in page
