"""A big collection restarts and answers its first query fast: the index file is loaded and checked
against the database's ids (not its vectors). benchmarks/restart_index.py runs this at 1,000,000."""

from __future__ import annotations

from pathlib import Path

from benchmarks.restart_index import prepare, restart


def test_a_collection_of_60000_graph_indexed_images_serves_its_first_query_within_seconds(tmp_path: Path):
    prepare(tmp_path / "data", n=60_000, factory="HNSW32", say=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "data" / "indexes").iterdir()) == ["collection-1.cbidx"]

    result = restart(tmp_path / "data")

    assert result["kind"] == "HNSW32" and result["ntotal"] == 60_000
    assert result["total_s"] < 10
