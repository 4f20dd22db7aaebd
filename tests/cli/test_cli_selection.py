"""`cbir train cdae`: the selection's table by default, the CDAE alone with --no-select."""

from __future__ import annotations

import io

import numpy as np
from click.testing import CliRunner
from PIL import Image

from app.catalog.collections import create_collection, get_collection
from app.cli import main
from app.context import open_context
from app.core.settings import Settings, get_settings
from app.ingest.sources.datasets import load_mnist
from app.ingest.store import Item, ingest_batch


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_train_cdae_prints_the_selection_and_no_select_trains_the_cdae_alone(settings: Settings) -> None:
    ctx = open_context(settings)
    try:
        images, labels = load_mnist(
            "train", datasets_dir=settings.datasets_dir, download_dir=settings.data_dir
        )
        create_collection(ctx, name="digits", embedder="cdae")
        items = [Item(f"d{i}.png", png(images[i]), {"label": str(labels[i])}) for i in range(200)]
        ingest_batch(ctx, collection="digits", items=items)
    finally:
        ctx.close()
    env = {
        "CBIR_DATA_DIR": str(settings.data_dir),
        "CBIR_DATASETS_DIR": str(settings.datasets_dir),
        "CBIR_DATABASE_URL": settings.database_url,
    }
    runner = CliRunner()
    get_settings.cache_clear()
    try:
        common = ["train", "cdae", "--collection", "digits", "--epochs", "1"]
        selected = runner.invoke(main, [*common, "--screen-epochs", "1"], env=env, catch_exceptions=False)
        assert selected.exit_code == 0, selected.output
        assert "candidate      stage       P@10  mAP@all" in selected.stdout
        for name in ("pixels", "pca64", "cdae-default", "cdae-strokes", "lenet5"):
            assert f"\n{name} " in selected.stdout
        assert selected.stdout.count("<- chosen") == 1
        get_settings.cache_clear()
        alone = runner.invoke(main, [*common, "--no-select"], env=env, catch_exceptions=False)
        assert alone.exit_code == 0, alone.output
        assert "P@10" not in alone.stdout and "(default, 1 epochs" in alone.stdout
    finally:
        get_settings.cache_clear()
    ctx = open_context(settings)
    try:
        info = get_collection(ctx, "digits")
        assert info.embedder == "cdae" and info.checkpoint is not None
        assert "selection" not in info.checkpoint["metrics"]  # the --no-select checkpoint is served now
    finally:
        ctx.close()
