"""``cbir bench embed``: raw and pipeline images/s in a table, and one JSON line with --json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from app.cli import main
from app.core.settings import get_settings
from tests.cli.test_cli import assert_clean_failure
from tests.conftest import DATASETS_DIR

HOLIDAYS = DATASETS_DIR / "inria-holidays-dev" / "jpg"
KEYS = ["embedder", "device", "batch", "raw_img_s", "pipeline_img_s", "runtime", "runtime_choice"]


@pytest.fixture
def bench(tmp_path: Path, torch_hub_dir: Path) -> Iterator[Callable[..., Result]]:
    """Run ``cbir bench embed ARGS`` offline (no downloads, an empty torch hub cache)."""
    env = {
        "CBIR_DATA_DIR": str(tmp_path / "data"),
        "CBIR_DATASETS_DIR": str(DATASETS_DIR),
        "CBIR_DEVICE": "cpu",
        "CBIR_WEIGHTS_DOWNLOAD": "0",
        "CBIR_TORCH_THREADS": "1",
    }
    threads = torch.get_num_threads()

    def invoke(*args: str, **overrides: str) -> Result:
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(main, ["bench", "embed", *args], env={**env, **overrides})
        finally:
            get_settings.cache_clear()

    yield invoke
    torch.set_num_threads(threads)


@pytest.fixture
def folder(tmp_path: Path, make_png: Callable[..., bytes]) -> Path:
    """Five PNGs and a file that is not an image (ignored by its suffix)."""
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(5):
        (images / f"{seed}.png").write_bytes(make_png(seed, size=(48, 32), mode="RGB"))
    (images / "notes.txt").write_text("not an image")
    return images


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Four INRIA Holidays photos."""
    if not HOLIDAYS.is_dir():
        pytest.skip(f"INRIA Holidays dev images not found at {HOLIDAYS} (set CBIR_DATASETS_DIR)")
    target = tmp_path / "photos"
    target.mkdir()
    for path in sorted(HOLIDAYS.glob("*.jpg"))[:4]:
        shutil.copy(path, target)
    return target


def summary(result: Result) -> dict[str, object]:
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    parsed = json.loads(line)
    assert list(parsed) == KEYS
    return parsed


def test_bench_tiny_prints_a_table_and_a_json_line(bench: Callable[..., Result], folder: Path):
    result = bench(
        "--embedder", "tiny", "--batch", "4", "--folder", str(folder), "--seconds", "0.2", "--json"
    )
    parsed = summary(result)
    assert parsed["embedder"] == "tiny" and parsed["device"] == "cpu" and parsed["batch"] == 4
    assert isinstance(parsed["raw_img_s"], float) and parsed["raw_img_s"] > 0
    assert isinstance(parsed["pipeline_img_s"], float) and parsed["pipeline_img_s"] > 0
    assert "raw forward (random input)" in result.stdout
    assert "decode + preprocess + forward" in result.stdout
    assert "1x8x8, batch 4" in result.stdout and "(5 files)" in result.stdout


def test_bench_without_json_prints_only_the_table(bench: Callable[..., Result], folder: Path):
    result = bench("--embedder", "pixels", "--batch", "2", "--folder", str(folder), "--seconds", "0.1")
    assert result.exit_code == 0, result.output
    assert "{" not in result.stdout and "pixels" in result.stdout


def test_bench_efficientnet_lite0_on_real_photos(bench: Callable[..., Result], photos: Path):
    result = bench(
        "--embedder",
        "efficientnet_lite0",
        "--batch",
        "2",
        "--folder",
        str(photos),
        "--seconds",
        "0.5",
        "--json",
    )
    parsed = summary(result)
    assert parsed["embedder"] == "efficientnet_lite0" and parsed["batch"] == 2
    assert parsed["raw_img_s"] > 0 and parsed["pipeline_img_s"] > 0  # type: ignore[operator]
    # the default input: the whole 640x480 probe, its shorter side at 288 px
    assert "3x288x384" in result.stdout
    # CBIR_CNN_RUNTIME=auto: both runtimes timed on a 4:3 photo's shape, the faster one used
    choice = parsed["runtime_choice"]
    assert isinstance(choice, dict) and choice["requested"] == "auto" and choice["state"] == "chosen"
    assert choice["reason"] in {"measured", "cached"} and choice["shape"] == [4, 3, 288, 384]
    faster = "onnx" if choice["onnx_img_s"] > choice["torch_img_s"] else "torch"
    assert parsed["runtime"] == choice["active"] == faster and f"{faster} chosen" in result.stdout


def test_bench_reads_the_datasets_folder_by_default(bench: Callable[..., Result]):
    if not HOLIDAYS.is_dir():
        pytest.skip(f"INRIA Holidays dev images not found at {HOLIDAYS} (set CBIR_DATASETS_DIR)")
    result = bench("--embedder", "tiny", "--seconds", "0.1")
    assert result.exit_code == 0, result.output
    assert f"{HOLIDAYS} (405 files)" in result.stdout


def test_bench_with_missing_weights_names_the_file(
    bench: Callable[..., Result], folder: Path, tmp_path: Path
):
    empty = tmp_path / "weights"
    empty.mkdir()
    result = bench("--embedder", "resnet18", "--folder", str(folder), CBIR_WEIGHTS_DIR=str(empty))
    assert_clean_failure(result, "resnet18-f37072fd.pth", str(empty))


def test_bench_with_a_written_checkpoint_measures_resnet18(
    bench: Callable[..., Result], folder: Path, cnn_weights: Callable[[str], Path]
):
    result = bench(
        "--embedder",
        "resnet18:pooling=gem",
        "--batch",
        "2",
        "--folder",
        str(folder),
        "--seconds",
        "0.2",
        "--json",
        CBIR_WEIGHTS_DIR=str(cnn_weights("resnet18")),
    )
    assert summary(result)["embedder"] == "resnet18:pooling=gem"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--embedder", "cdae"], ["trained per collection"]),
        (["--embedder", "resnet9000"], ["unknown embedder 'resnet9000'"]),
        (["--embedder", "resnet18:layer=nope"], ["layer must be one of layer4, layer3"]),
    ],
)
def test_bench_refuses_what_it_cannot_measure(
    bench: Callable[..., Result], folder: Path, args: list[str], fragments: list[str]
):
    assert_clean_failure(bench(*args, "--folder", str(folder)), *fragments)


def test_bench_needs_a_folder_with_images(bench: Callable[..., Result], tmp_path: Path):
    assert_clean_failure(bench("--embedder", "tiny", "--folder", str(tmp_path / "nowhere")), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(bench("--embedder", "tiny", "--folder", str(tmp_path / "empty")), "holds no")
