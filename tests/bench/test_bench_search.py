"""``cbir bench search``: a small real collection (500 MNIST digits, the ``pixels`` embedder) loaded
into FAISS in process and into a milvus-lite server the command starts; a table and one JSON line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from app.bench.embedding import BenchError
from app.bench.search import make_queries, parse_backends
from app.catalog.collections import create_collection
from app.cli import main
from app.context import open_context
from app.core.settings import Settings, get_settings
from app.ingest.sources.datasets import load_mnist
from app.ingest.store import Item, ingest_batch
from index.milvus_lite import milvus_lite_binary
from tests.conftest import DATASETS_DIR
from tests.milvus_server import milvus_unavailable, require_pymilvus

DIGITS = 500
KEYS = {"name", "version", "kind", "load_s", "p50_ms", "p95_ms", "label_p50_ms", "label_p95_ms", "agree_at_k"}


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite data folder holding ``digits``: 500 MNIST test digits with their labels, ``pixels``."""
    data_dir = tmp_path_factory.mktemp("bench-search") / "data"
    settings = Settings(data_dir=data_dir, datasets_dir=DATASETS_DIR, import_processes=False)
    ctx = open_context(settings)
    try:
        images, labels = load_mnist("test", datasets_dir=DATASETS_DIR, download_dir=data_dir / "datasets")
        create_collection(ctx, name="digits", embedder="pixels")
        items = [Item(f"d{i}.png", png(images[i]), {"label": str(labels[i])}) for i in range(DIGITS)]
        assert {r.status for r in ingest_batch(ctx, collection="digits", items=items)} == {"added"}
    finally:
        ctx.close()
    return data_dir


def bench(data_dir: Path, *args: str) -> Result:
    get_settings.cache_clear()
    env = {"CBIR_DATA_DIR": str(data_dir), "CBIR_DATABASE_URL": "", "CBIR_DATASETS_DIR": str(DATASETS_DIR)}
    try:
        return CliRunner().invoke(main, ["bench", "search", "--collection", "digits", *args], env=env)
    finally:
        get_settings.cache_clear()


def test_bench_search_times_faiss_plain_and_filtered_and_prints_one_json_line(digits_dir: Path) -> None:
    result = bench(digits_dir, "--backends", "faiss", "--queries", "20", "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (summary["collection"], summary["n"], summary["dim"], summary["k"]) == ("digits", DIGITS, 784, 10)
    (faiss_row,) = summary["backends"]
    assert set(faiss_row) == KEYS and faiss_row["name"] == "faiss" and faiss_row["kind"] == "Flat"
    assert 0 < faiss_row["p50_ms"] <= faiss_row["p95_ms"]
    assert 0 < faiss_row["label_p50_ms"] <= faiss_row["label_p95_ms"]
    assert faiss_row["agree_at_k"] == 1.0
    assert "| faiss |" in result.output


def test_bench_search_through_a_milvus_lite_server_agrees_with_faiss(digits_dir: Path) -> None:
    require_pymilvus()  # skips, or fails under CBIR_REQUIRE_MILVUS=1 (CI)
    if milvus_lite_binary() is None:
        milvus_unavailable("milvus-lite is not installed (pip install -e '.[dev]')")

    result = bench(digits_dir, "--backends", "faiss,milvus", "--queries", "20", "--k", "5", "--json")

    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output.strip().splitlines()[-1])["backends"]}
    assert list(rows) == ["faiss", "milvus"]
    milvus = rows["milvus"]
    assert milvus["version"].startswith("milvus_lite") and milvus["p50_ms"] > 0 and milvus["label_p95_ms"] > 0
    assert milvus["agree_at_k"] >= 0.95  # both exact: the same rows, ties aside
    assert not list((digits_dir / "tmp").glob("bench-search-*"))  # its server's data folder is gone


def test_bench_search_over_http_times_single_requests_against_batches(digits_dir: Path) -> None:
    result = bench(
        digits_dir, "--http", "--backends", "faiss", "--queries", "30", "--batch-size", "10", "--json"
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["collection"] == "digits" and summary["queries"] == 30
    single, batch = summary["single"], summary["batch"]
    assert {"qps", "client_p50_ms", "server_p50_ms", "client_server_ratio"} <= single.keys()
    assert 0 < single["server_p50_ms"] < single["client_p50_ms"]
    assert single["client_server_ratio"] == pytest.approx(
        single["client_p50_ms"] / single["server_p50_ms"], rel=1e-2
    )
    assert batch["size"] == 10 and batch["qps"] > 0
    assert batch["speedup"] == pytest.approx(batch["qps"] / single["qps"], rel=1e-2)
    assert [row["name"] for row in summary["backends"]] == ["faiss"]  # both modes when both are asked
    assert "| single |" in result.output and "| batch of 10 |" in result.output
    assert not list((digits_dir / "tmp").glob("bench-serve-*.log"))  # the server's log is gone


def test_bench_search_http_alone_and_a_url_that_does_not_answer(digits_dir: Path) -> None:
    result = bench(digits_dir, "--url", "http://127.0.0.1:9", "--queries", "10", "--json")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "127.0.0.1:9" in result.output


def test_bench_search_refuses_a_missing_collection_and_unknown_backends(
    digits_dir: Path, tmp_path: Path
) -> None:
    missing = bench(digits_dir, "--collection", "nope", "--backends", "faiss")
    assert missing.exit_code != 0 and "no collection named 'nope'" in missing.output
    no_database = bench(tmp_path / "never-built", "--backends", "faiss")
    assert no_database.exit_code != 0 and "cannot read collection 'digits'" in no_database.output
    assert "Traceback" not in no_database.output
    with pytest.raises(BenchError, match="comma-separated"):
        parse_backends("faiss,pinecone")


def test_queries_are_noisy_unit_copies_of_stored_rows() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries, rows = make_queries(vectors, 50, seed=1)
    assert queries.shape == (50, 16) and queries.dtype == np.float32
    assert np.allclose(np.linalg.norm(queries, axis=1), 1, atol=1e-5)
    similarity = np.einsum("ij,ij->i", queries, vectors[rows])
    assert (similarity > 0.8).all() and (similarity < 0.99999).all()
