"""Holidays-style evaluation, folder imports with aliases, whitening and query expansion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.catalog.collections import create_collection, get_collection
from app.context import AppContext
from app.core.errors import InvalidRequest
from app.data.records import ImageRecord
from app.ingest import jobs
from app.ingest.sources.folder import check_folder
from app.ingest.sources.holidays import check_groundtruth, read_groundtruth
from app.learning import groundtruth as gt
from app.learning import tuning
from app.search import query as search
from tests.holidays import holidays_subset


@pytest.fixture
def holidays(ctx: AppContext, tmp_path: Path) -> dict[str, list[str]]:
    """The Holidays subset imported from a folder into collection ``holidays`` (tiny embedder)."""
    truth = holidays_subset(tmp_path / "jpg")
    create_collection(ctx, name="holidays", embedder="tiny")
    runner = jobs.JobRunner(ctx)
    source = check_folder(tmp_path / "jpg")
    job_id = runner.create_job(collection="holidays", source=source)
    runner.run_import(job_id=job_id, collection="holidays", source=source)
    return truth


def test_folder_import_keeps_names_and_records_duplicate_names_as_aliases(
    ctx: AppContext, holidays: dict[str, list[str]], tmp_path: Path
) -> None:
    files = sorted(p.name for p in (tmp_path / "jpg").iterdir())
    info = get_collection(ctx, "holidays")
    assert info.image_count == len(files) - 3  # three files of group 1039 repeat group 1031's bytes
    (job,) = jobs.list_jobs(ctx, collection="holidays")
    assert (job.record.added, job.record.duplicates, job.record.failed) == (len(files) - 3, 3, 0)
    rows = {r.original_name: r.meta for r in _images(ctx)}
    assert rows["103100.jpg"]["aliases"] == ["103900.jpg"]
    assert "103900.jpg" not in rows


def test_groundtruth_ranks_every_named_file_with_the_query_left_out(
    ctx: AppContext, holidays: dict[str, list[str]]
) -> None:
    (row,) = gt.evaluate_with_groundtruth(ctx, collection="holidays", groundtruth=holidays)
    assert row["queries"] == len(holidays) == 8
    assert row["database"] == sum(1 + len(r) for r in holidays.values())  # aliases are entries too
    assert row["unmatched"] == 0
    assert 0.0 < row["map_all"] <= 1.0 and 0.0 < row["p_at_10"] <= 1.0
    # the same vectors scored by hand: each query against the others, INRIA's AP
    rows = gt.evaluate_with_groundtruth(
        ctx, collection="holidays", groundtruth=holidays, qe=[0, 1], whiten=[0, 8]
    )
    assert [(r["whiten"], r["qe"]) for r in rows] == [(0, 0), (0, 1), (8, 0), (8, 1)]
    assert rows[0]["map_all"] == row["map_all"]


def test_groundtruth_that_matches_nothing_is_a_clear_error(
    ctx: AppContext, holidays: dict[str, list[str]]
) -> None:
    with pytest.raises(InvalidRequest, match="original file name"):
        gt.evaluate_with_groundtruth(ctx, collection="holidays", groundtruth={"nope.jpg": ["other.jpg"]})
    with pytest.raises(InvalidRequest, match="non-empty JSON object"):
        check_groundtruth([])


def test_read_groundtruth_rejects_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"a.jpg": "b.jpg"}))
    with pytest.raises(InvalidRequest, match="list of file names"):
        read_groundtruth(path)
    path.write_text("{not json")
    with pytest.raises(InvalidRequest, match="cannot read ground truth"):
        read_groundtruth(path)


def test_whitening_is_served_and_applied_to_queries(
    ctx: AppContext, holidays: dict[str, list[str]], tmp_path: Path
) -> None:
    saved = tuning.whiten_collection(ctx, collection="holidays", dim=8)
    info = get_collection(ctx, "holidays")
    assert info.whitening == 8 and info.dim == 8 and info.embedder_version == saved.version
    assert info.embedded_count == info.image_count
    query = (tmp_path / "jpg" / "100000.jpg").read_bytes()
    result = search.search_by_image(ctx, collection="holidays", data=query, k=3)
    assert result.hits[0].record.original_name == "100000.jpg"
    assert result.hits[0].score == pytest.approx(1.0, abs=1e-5)
    # a restart finds the same whitening (the embedder is rebuilt from the checkpoint file)
    ctx.embedders.clear()
    again = search.search_by_image(ctx, collection="holidays", data=query, k=3)
    assert [h.image_id for h in again.hits] == [h.image_id for h in result.hits]
    # refitting starts from the network's codes, not the whitened ones
    second = tuning.whiten_collection(ctx, collection="holidays", dim=4)
    assert get_collection(ctx, "holidays").dim == 4 and second.version != saved.version


def test_whitening_refuses_too_many_dims_and_trainable_embedders(
    ctx: AppContext, holidays: dict[str, list[str]]
) -> None:
    with pytest.raises(InvalidRequest, match="needs at least"):
        tuning.whiten_collection(ctx, collection="holidays", dim=500)
    create_collection(ctx, name="digits", embedder="cdae")
    with pytest.raises(InvalidRequest, match="pretrained embedders"):
        tuning.whiten_collection(ctx, collection="digits", dim=8)


def test_query_expansion_reranks_with_the_first_results(
    ctx: AppContext, holidays: dict[str, list[str]], tmp_path: Path
) -> None:
    query = (tmp_path / "jpg" / "100100.jpg").read_bytes()
    plain = search.search_by_image(ctx, collection="holidays", data=query, k=10)
    tuning.set_search_options(ctx, collection="holidays", qe=2, qe_alpha=3.0)
    expanded = search.search_by_image(ctx, collection="holidays", data=query, k=10)
    assert "expand" in expanded.timings_ms and "expand" not in plain.timings_ms
    assert len(expanded.hits) == 10
    # the expanded query is the normalised sum of the query and its first two results' codes
    scores = np.array([h.score for h in expanded.hits])
    assert np.all(np.diff(scores) <= 1e-6)
    off = search.search_by_image(ctx, collection="holidays", data=query, k=10, qe=0)
    assert [h.image_id for h in off.hits] == [h.image_id for h in plain.hits]
    with pytest.raises(InvalidRequest, match="qe must be"):
        tuning.set_search_options(ctx, collection="holidays", qe=99, qe_alpha=3.0)


def _images(ctx: AppContext) -> list[ImageRecord]:
    with ctx.db.session() as session:
        return list(session.scalars(select(ImageRecord)).all())
