"""`cbir duplicates find|list|resolve` on a collection with near copies."""

from __future__ import annotations

import io
import json

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image

from app.catalog.collections import create_collection
from app.cli import main
from app.context import open_context
from app.core.settings import Settings, get_settings
from app.ingest.store import Item, ingest_batch


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_find_list_and_resolve_from_the_shell(settings: Settings) -> None:
    rng = np.random.default_rng(0)
    bases = [rng.integers(0, 256, size=(32, 32), dtype=np.uint8) for _ in range(3)]
    items = []
    for b, base in enumerate(bases):
        for copy in range(3 if b == 0 else 1):  # three near copies of the first pattern
            pixels = base.copy()
            pixels[0, copy] ^= 1  # one pixel apart: other bytes, almost the same code
            items.append(Item(f"p{b}_{copy}.png", png(pixels), {"label": f"p{b}"}))
    ctx = open_context(settings)
    try:
        create_collection(ctx, name="shapes", embedder="tiny")
        ingest_batch(ctx, collection="shapes", items=items)
    finally:
        ctx.close()
    env = {
        "CBIR_DATA_DIR": str(settings.data_dir),
        "CBIR_DATASETS_DIR": str(settings.datasets_dir),
        "CBIR_DATABASE_URL": settings.database_url,
    }

    def cli(*args: str) -> Result:
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(main, list(args), env=env)
        finally:
            get_settings.cache_clear()

    empty = cli("duplicates", "list", "shapes")
    assert empty.exit_code == 0 and "no duplicate run yet" in empty.stdout

    found = cli("duplicates", "find", "shapes", "--threshold", "0.999", "--json")
    assert found.exit_code == 0, found.output
    summary = json.loads(found.stdout.splitlines()[-1])
    assert (summary["images"], summary["groups"], summary["pairs"]) == (5, 1, 3)

    listed = cli("duplicates", "list", "shapes", "--json")
    group = json.loads(listed.stdout)["groups"][0]
    names = sorted(m["original_name"] for m in group["members"])
    assert names == ["p0_0.png", "p0_1.png", "p0_2.png"]
    kept = group["members"][0]["image_id"]

    resolved = cli("duplicates", "resolve", "shapes", str(group["id"]), "--keep", str(kept))
    assert resolved.exit_code == 0, resolved.output
    assert f"group {group['id']} (3 images, resolved" in resolved.stdout and f"keep {kept}" in resolved.stdout
    assert "resolved: 1" in cli("duplicates", "list", "shapes", "--status", "resolved").stdout

    both = cli("duplicates", "resolve", "shapes", str(group["id"]), "--keep", "1", "--reopen")
    assert both.exit_code != 0 and "exactly one" in both.output
    stranger = cli("duplicates", "resolve", "shapes", str(group["id"]), "--keep", "999")
    assert stranger.exit_code != 0 and "not a member" in stranger.stderr
    missing = cli("duplicates", "find", "nowhere")
    assert missing.exit_code != 0 and "nowhere" in missing.stderr and "Traceback" not in missing.output
