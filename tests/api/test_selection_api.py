"""The embedder selection as the API and the Evaluate page show it (GET /collections/{name})."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.catalog.collections import create_collection
from app.context import open_context
from app.core.settings import Settings
from app.ingest.sources.datasets import load_mnist
from app.ingest.store import Item, ingest_batch
from app.learning.selection import select_and_train
from app.main import create_app


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def build(settings: Settings, *, name: str, count: int, labelled: bool) -> int:
    """``count`` real MNIST digits in a new collection, then `cbir train cdae`'s selection (1 epoch)."""
    ctx = open_context(settings)
    try:
        images, labels = load_mnist(
            "train", datasets_dir=settings.datasets_dir, download_dir=settings.data_dir
        )
        create_collection(ctx, name=name, embedder="cdae")
        items = [
            Item(f"d{i}.png", png(images[i]), {"label": str(labels[i])} if labelled else {})
            for i in range(count)
        ]
        ingest_batch(ctx, collection=name, items=items)
        outcome = select_and_train(ctx, collection=name, epochs=1, screen_images=count, screen_epochs=1)
        return outcome.checkpoint.id
    finally:
        ctx.close()


def test_collection_shows_the_selection_table_and_the_served_winner(settings: Settings) -> None:
    checkpoint_id = build(settings, name="digits", count=300, labelled=True)
    with TestClient(create_app(settings)) as client:
        info = client.get("/api/v1/collections/digits").json()
        selection = info["selection"]
        assert selection["validated"] is True and selection["held_out"] + selection["database"] == 300
        names = [(row["name"], row["stage"]) for row in selection["table"]]
        assert names[:5] == [
            ("pixels", "baseline"),
            ("pca64", "baseline"),
            ("cdae-default", "screen"),
            ("cdae-strokes", "screen"),
            ("lenet5", "screen"),
        ]
        [chosen] = [row for row in selection["table"] if row["chosen"]]
        assert chosen["name"] == selection["winner"] and chosen["checkpoint_id"] == checkpoint_id
        assert info["checkpoint"]["id"] == checkpoint_id and info["ready"]
        best = max(
            (r for r in selection["table"] if r["stage"] != "screen"),
            key=lambda r: r["p_at_10"] + r["map_all"],
        )
        assert best is not None and chosen == best

        page = client.get("/evaluate", params={"collection": "digits"})
        assert page.status_code == 200
        assert "How the embedder was chosen" in page.text and "cdae-strokes" in page.text
        assert f'<tr class="chosen">\n        <th scope="row">{chosen["name"]}</th>' in page.text

        listed = client.get("/api/v1/collections").json()["collections"]
        assert listed[0]["selection"]["winner"] == selection["winner"]


def test_unlabelled_collection_says_its_cdae_was_not_validated(settings: Settings) -> None:
    build(settings, name="plain", count=100, labelled=False)
    with TestClient(create_app(settings)) as client:
        info = client.get("/api/v1/collections/plain").json()
        assert info["embedder"] == "cdae" and info["ready"]
        selection = info["selection"]
        assert selection["validated"] is False and selection["winner"] == "cdae-default"
        assert selection["reason"].startswith("not validated")
        assert selection["table"][0]["p_at_10"] is None
        page = client.get("/evaluate", params={"collection": "plain"})
        assert "not validated" in page.text


def test_a_collection_never_selected_has_no_selection(client: TestClient, collection: str) -> None:
    assert client.get(f"/api/v1/collections/{collection}").json()["selection"] is None
    assert "How the embedder was chosen" not in client.get("/evaluate").text
