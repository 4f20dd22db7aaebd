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


def test_bench_import_holidays_gives_the_forward_rate_alone_and_the_ratio_to_it(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Six of the Holidays photos in a datasets folder of their own, efficientnet_lite0 in torch.
    folder = tmp_path / "datasets" / "inria-holidays-dev" / "jpg"
    folder.mkdir(parents=True)
    for path in sorted((DATASETS_DIR / "inria-holidays-dev" / "jpg").glob("*.jpg"))[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("CBIR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CBIR_DATASETS_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("CBIR_CNN_RUNTIME", "torch")
    from app.core.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["bench", "import", "--workload", "holidays", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert "forward alone" in lines[2] and "ratio to forward" in lines[2]
    (workload,) = json.loads(lines[-1])["workloads"]
    assert workload["name"] == "holidays" and workload["images"] == 6
    assert workload["runtime"] == "torch" and workload["raw_forward_img_s"] > 0
    # the rates are printed to 0.1 img/s, the ratio from the unrounded rates
    end, raw = workload["end_to_end_img_s"], workload["raw_forward_img_s"]
    assert (
        (end - 0.05) / (raw + 0.05) - 1e-3
        <= workload["ratio_to_forward"]
        <= (end + 0.05) / (raw - 0.05) + 1e-3
    )


def test_the_mnist_workload_has_no_forward_rate_of_its_own(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.bench.imports import WorkloadResult

    result = WorkloadResult(
        name="mnist",
        embedder="cdae",
        images=10,
        end_to_end_img_s=5.0,
        stage_img_s={"read": 10.0, "decode": 10.0, "embed": 10.0, "write": 6.0},
        peak_rss_mb=1.0,
    )
    assert result.ratio_to_forward is None
    assert "raw_forward_img_s" not in result.as_json() and "ratio_to_forward" not in result.as_json()
