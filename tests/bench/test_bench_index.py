"""``cbir bench index``: every kind measured on tiled codes, a table, and one JSON line with --json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from app.bench.indexes import noise_scale, tile
from app.cli import main
from app.core.settings import get_settings

KEYS = {"factory", "build_s", "bytes_per_vector", "qps_1thread", "qps", "recall_at_10"}


def codes_file(tmp_path: Path, *, n: int = 1500, dim: int = 16) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, dim))
    codes = centres[rng.integers(0, 30, size=n)] + rng.normal(scale=0.3, size=(n, dim))
    path = tmp_path / "codes.npy"
    np.save(path, codes.astype(np.float32))
    return path


def run(tmp_path: Path, *args: str):  # type: ignore[no-untyped-def]
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(
            main, ["bench", "index", *args], env={"CBIR_DATA_DIR": str(tmp_path / "data")}
        )
    finally:
        get_settings.cache_clear()


def test_bench_index_prints_a_table_and_a_json_line_for_each_kind(tmp_path: Path) -> None:
    path = codes_file(tmp_path)
    result = run(
        tmp_path,
        *("--n", "3000", "--dim", "16", "--codes", str(path), "--queries", "50", "--seconds", "0.05"),
        *("--factory", "Flat", "--factory", "HNSW16", "--factory", "IVF16,PQ4", "--json", "--threads", "1"),
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["n"] == 3000 and summary["dim"] == 16 and summary["exact_qps_1thread"] > 0
    kinds = {kind["factory"]: kind for kind in summary["kinds"]}
    assert set(kinds) == {"Flat", "HNSW16", "IVF16,PQ4"}
    assert all(set(kind) == KEYS for kind in kinds.values())
    assert kinds["Flat"]["recall_at_10"] == 1.0 and kinds["HNSW16"]["recall_at_10"] >= 0.9
    assert kinds["IVF16,PQ4"]["bytes_per_vector"] < kinds["Flat"]["bytes_per_vector"] / 3
    assert "| `HNSW16` |" in result.output


def test_bench_index_refuses_codes_of_another_dimension(tmp_path: Path) -> None:
    result = run(tmp_path, "--n", "2000", "--dim", "32", "--codes", str(codes_file(tmp_path)))
    assert result.exit_code != 0 and "expected (rows, 32)" in result.output


def test_tiles_are_noisy_unit_copies_of_the_codes() -> None:
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(100, 8)).astype(np.float32)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    rows = tile(codes, 350, scale=noise_scale(codes), seed=0)
    assert rows.shape == (350, 8) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    nearest = (rows @ codes.T).max(axis=1)
    assert (nearest > 0.8).all() and (nearest < 0.99999).any()  # near a code, not equal to one
