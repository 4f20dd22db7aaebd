"""The generalisation suite: its data sets, its scoring, and `cbir bench quality`."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from click.testing import Result

from app.bench import quality as bench_quality
from app.bench.quality_sets import SET_NAMES, load_set
from tests.cli.test_cli import cli  # noqa: F401  (the fixture)
from tests.conftest import DATASETS_DIR


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_set_is_28x28_uint8_with_a_label_per_image_and_queries_apart(name: str) -> None:
    data = load_set(name, datasets_dir=DATASETS_DIR, db=600, queries=200)
    for images, labels in ((data.db_images, data.db_labels), (data.query_images, data.query_labels)):
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert labels.shape == (len(images),) and labels.dtype == np.int64
    # Every query has at least one relevant stored image; no query is stored as well.
    assert set(data.query_labels) <= set(data.db_labels)
    stored = {image.tobytes() for image in data.db_images}
    assert sum(image.tobytes() in stored for image in data.query_images) < len(data.query_images) * 0.02
    assert data.about and "``" not in data.about


def test_the_variants_change_what_they_say() -> None:
    plain = load_set("mnist", datasets_dir=DATASETS_DIR, db=50, queries=10)
    inverted = load_set("mnist-inverted", datasets_dir=DATASETS_DIR, db=50, queries=10)
    thick = load_set("mnist-thick", datasets_dir=DATASETS_DIR, db=50, queries=10)
    assert np.array_equal(inverted.db_images, 255 - plain.db_images)
    assert (thick.db_images > 127).sum() > 1.5 * (plain.db_images > 127).sum()  # thicker strokes
    turned = load_set("mnist-turned", datasets_dir=DATASETS_DIR, db=400, queries=100)
    assert set(turned.db_labels) == set(range(10))  # five digits, each as written and turned


def test_a_method_that_ignores_the_image_scores_at_chance_and_pixels_do_better() -> None:
    data = load_set("digits-8x8", datasets_dir=DATASETS_DIR)
    rng = np.random.default_rng(0)
    noise = bench_quality.score(
        data,
        db=rng.normal(size=(len(data.db_images), 16)),
        queries=rng.normal(size=(len(data.query_images), 16)),
    )
    rows = bench_quality.run_set(data, methods=("pixels", "pca"), device=torch.device("cpu"))
    assert noise[0] < 0.2  # ten classes: about 0.1
    assert all(row.p_at_10 > 0.9 and row.map_all > 0.6 for row in rows)


def test_cli_prints_a_table_and_a_json_summary_last(cli: Callable[..., Result]) -> None:  # noqa: F811
    result = cli(
        "bench", "quality", "--set", "holidays-28", "--method", "pixels", "--method", "cdae-default",
        "--epochs", "1", "--cdae-set", "min_steps=0", "--cdae-set", "pixel_pca_dims=8", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["set", "method", "P@10"]
    summary = json.loads(lines[-1])
    figures = summary["sets"]["holidays-28"]
    assert set(figures) == {"pixels", "cdae-default"}
    assert 0 < figures["pixels"]["map_all"] < 1 and 0 < figures["cdae-default"]["map_all"] < 1
    assert "1 epochs" in {row["note"] for row in summary["rows"]}
    assert set(summary["default_beats_pixels"]) == {"holidays-28"}


def test_cli_refuses_an_unknown_set_or_change_cleanly(cli: Callable[..., Result]) -> None:  # noqa: F811
    result = cli("bench", "quality", "--set", "cifar", "--method", "pixels")
    assert result.exit_code != 0 and "unknown quality set 'cifar'" in result.output
    result = cli(
        "bench", "quality", "--set", "holidays-28", "--method", "cdae-default", "--cdae-set", "bogus=1"
    )
    assert result.exit_code != 0 and "bogus" in result.output
    assert "Traceback" not in result.output
