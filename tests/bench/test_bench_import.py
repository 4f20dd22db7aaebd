"""`cbir bench import`: each stage alone and the whole pipeline, in one run, with the issue's JSON keys."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from app.cli import main
from tests.conftest import DATASETS_DIR

pytestmark = pytest.mark.slow


def test_bench_import_prints_a_table_and_the_json_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CBIR_DATASETS_DIR", str(DATASETS_DIR))
    from app.core.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            main, ["bench", "import", "--workload", "mnist", "--images", "300", "--json"]
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("workload") and "ratio" in lines[0]
    summary = json.loads(lines[-1])
    (workload,) = summary["workloads"]
    assert set(workload) >= {
        "name",
        "images",
        "end_to_end_img_s",
        "slowest_stage",
        "slowest_stage_img_s",
        "ratio",
        "peak_rss_mb",
    }
    assert workload["name"] == "mnist" and workload["images"] == 300
    assert workload["slowest_stage"] in workload["stage_img_s"]
    assert workload["slowest_stage_img_s"] == min(workload["stage_img_s"].values())
    assert workload["ratio"] == pytest.approx(
        workload["end_to_end_img_s"] / workload["slowest_stage_img_s"], rel=0.01
    )


def test_bench_import_refuses_more_digits_than_mnist_has(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CBIR_DATASETS_DIR", str(DATASETS_DIR))
    from app.core.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["bench", "import", "--workload", "mnist", "--images", "70001"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code != 0 and "MNIST train has 60000 images" in result.output
