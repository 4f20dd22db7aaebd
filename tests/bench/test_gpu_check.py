"""benchmarks/gpu_check.sh on the CPU at tiny sizes: every section runs and the last line is JSON, so the
GPU check cannot rot between the runs on a CUDA machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DATASETS_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    if not (DATASETS_DIR / "inria-holidays-dev" / "jpg").is_dir() or not (DATASETS_DIR / "mnist").is_dir():
        pytest.skip(f"INRIA Holidays dev images or MNIST not found in {DATASETS_DIR}")
    env = {
        **os.environ,
        "CBIR_PYTHON": sys.executable,
        "CBIR_DATASETS_DIR": str(DATASETS_DIR),
        "CBIR_WEIGHTS_DOWNLOAD": "0",
        "CBIR_WEIGHTS_DIR": str(tmp_path / "weights"),  # empty: resnet50 is skipped, never downloaded
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "CBIR_CNN_RUNTIME": "torch",  # the ONNX export is tested elsewhere; this keeps it to seconds
        "CBIR_TORCH_THREADS": "1",
    }
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["device"] == "cpu" and out["tiny"] is True and out["errors"] == {}
    rows = out["embed"]["rows"]
    assert [(r["embedder"], r["batch"]) for r in rows] == [
        ("efficientnet_lite0", 1),
        ("efficientnet_lite0", 2),
    ]
    assert all(r["raw_img_s"] > 0 and r["pipeline_img_s"] > 0 and r["channels_last"] for r in rows)
    assert [s["embedder"] for s in out["embed"]["skipped"]] == ["resnet50"]
    assert "resnet50-11ad3fa6.pth" in out["embed"]["skipped"][0]["reason"]
    holidays = out["holidays_import"]
    assert holidays["name"] == "holidays" and holidays["images"] == 4 and holidays["end_to_end_img_s"] > 0
    assert out["cdae_epoch"]["images"] == 256 and out["cdae_epoch"]["img_s"] > 0
    query = out["query"]
    assert query["queries"] == 4 and 0 < query["p50_ms"] <= query["p95_ms"] and query["runtime"] == "torch"


def test_gpu_check_refuses_cuda_where_there_is_none() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cuda"],
        env={**os.environ, "CBIR_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "CUDA is not available" in done.stderr
