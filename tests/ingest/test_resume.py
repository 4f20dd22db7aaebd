"""Resumable imports in one process: a job stopped after a committed batch resumes at its cursor
on the next start and ends exact; files of batches that never committed are removed on start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.catalog.collections import create_collection, get_collection
from app.context import AppContext, open_context
from app.core.settings import Settings
from app.data.records import EmbeddingRecord, ImageRecord
from app.data.storage import FileJournal, sha256_hex
from app.ingest import jobs
from app.ingest import pipeline as pipeline_module
from app.ingest.sources.archive import ArchiveSource, check_archive
from app.ingest.sources.base import Source
from app.ingest.sources.folder import check_folder
from app.ingest.store import Accepted, Item, add_image, store_accepted
from app.main import create_app
from tests.api.test_imports import make_zip

REPO = Path(__file__).resolve().parents[2]
BATCH = 16
MEMBERS = 50
# positions of two copies of earlier members and of three files that are not images
COPIES = {5: 2, 40: 3}
BAD = (10, 20, 49)


@pytest.fixture
def settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Batches of 16 members in chunks of 8: a 50-member import commits four times."""
    monkeypatch.setattr(pipeline_module, "CHUNK_ITEMS", 8)
    return settings.model_copy(update={"import_batch_size": BATCH})


@pytest.fixture
def archive(make_png: Callable[..., bytes]) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for i in range(MEMBERS):
        name = f"{'abc'[i % 3]}/{i:03d}.png"
        if i in BAD:
            members[name] = b"not an image %d" % i
        elif i in COPIES:
            members[name] = members[f"{'abc'[COPIES[i] % 3]}/{COPIES[i]:03d}.png"]
        else:
            members[name] = make_png(i, size=(12, 12))
    return members


ADDED = MEMBERS - len(COPIES) - len(BAD)


def upload(ctx: AppContext, tmp_path: Path, members: dict[str, bytes]) -> ArchiveSource:
    """The archive as the HTTP route leaves it: kept in the uploads folder, checked."""
    path = tmp_path / "photos.zip"
    path.write_bytes(make_zip(members))
    return check_archive(jobs.keep_upload(ctx, path, suffix=".archive"), "photos.zip")


def interrupted_job(ctx: AppContext, source: Source, *, collection: str = "r") -> str:
    """A job stopped as a shutdown stops it: after its first committed batch, left "running"."""
    create_collection(ctx, name=collection, embedder="tiny")
    runner = jobs.JobRunner(ctx)
    job_id = runner.create_job(collection=collection, source=source)
    runner.run_import(
        job_id=job_id,
        collection=collection,
        source=source,
        on_progress=lambda counts, total: runner.shutdown(),
    )
    record = jobs.get_job(ctx, job_id).record
    assert (record.state, record.cursor, record.done, record.total) == ("running", BATCH, BATCH, MEMBERS)
    return job_id


def report_rows(ctx: AppContext, job_id: str) -> list[dict]:
    return [json.loads(line) for line in jobs.report_path(ctx, job_id).read_text().splitlines()]


def stored_counts(ctx: AppContext) -> tuple[int, int, int, int]:
    """(image rows, distinct SHA-256 among them, vectors, image files on disk)."""
    with ctx.db.session() as session:
        rows = session.scalar(select(func.count()).select_from(ImageRecord))
        distinct = session.scalar(select(func.count(func.distinct(ImageRecord.sha256))))
        vectors = session.scalar(select(func.count()).select_from(EmbeddingRecord))
    files = sum(1 for p in ctx.settings.images_dir.rglob("*") if p.is_file())
    return rows or 0, distinct or 0, vectors or 0, files


@pytest.fixture
def resumed_runner(ctx: AppContext) -> Iterator[list[jobs.JobRunner]]:
    """Runners a test starts to resume jobs; shut down at its end."""
    runners: list[jobs.JobRunner] = []
    yield runners
    for runner in runners:
        runner.shutdown()


def test_a_job_stopped_after_a_batch_resumes_at_its_cursor_and_ends_exact(
    ctx: AppContext, tmp_path: Path, archive: dict[str, bytes], resumed_runner: list[jobs.JobRunner]
) -> None:
    source = upload(ctx, tmp_path, archive)
    job_id = interrupted_job(ctx, source)
    assert source.path.exists()  # kept for the resume
    first = report_rows(ctx, job_id)
    assert [r["item"] for r in first] == list(archive)[:BATCH]
    assert stored_counts(ctx)[0] == BATCH - 2  # a copy and a bad file among the first 16
    # A killed process may have written report lines of a batch that never committed.
    with jobs.report_path(ctx, job_id).open("ab") as handle:
        handle.write(b'{"item": "ghost.png", "status": "added"}\n{"item": "torn')

    runner = jobs.JobRunner(ctx)
    resumed_runner.append(runner)
    assert runner.recover() == 1
    info = jobs.wait_for_job(ctx, job_id, timeout=60)
    record = info.record
    assert record.state == "succeeded", record.error
    assert record.resumes == 1
    assert (record.done, record.added, record.duplicates, record.failed) == (MEMBERS, ADDED, 2, 3)
    assert record.cursor == record.total == MEMBERS
    assert sorted(e["item"] for e in record.errors) == sorted(list(archive)[i] for i in BAD)

    rows = report_rows(ctx, job_id)
    assert [r["item"] for r in rows] == list(archive)  # each member once, in order
    assert rows[:BATCH] == first
    statuses = [r["status"] for r in rows]
    assert statuses.count("added") == ADDED and statuses.count("duplicate") == 2
    assert {rows[i]["image_id"] for i in COPIES} == {rows[j]["image_id"] for j in COPIES.values()}

    images, distinct, vectors, files = stored_counts(ctx)
    assert images == distinct == vectors == files == ADDED  # nothing added twice
    info_c = get_collection(ctx, "r")
    assert info_c.image_count == info_c.embedded_count == info_c.index_size == ADDED
    assert not source.path.exists()  # the upload goes when the job ends


def test_resuming_never_reads_the_committed_members_again(
    ctx: AppContext, tmp_path: Path, make_png: Callable[..., bytes], resumed_runner: list[jobs.JobRunner]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(MEMBERS):
        (folder / f"{i:03d}.png").write_bytes(make_png(i, size=(8, 8)))
    source = check_folder(folder)
    job_id = interrupted_job(ctx, source)
    # Spoil the committed files (names kept, so positions stay): a resume that read them again
    # would reject them as not images.
    for i in range(BATCH):
        (folder / f"{i:03d}.png").write_bytes(b"spoilt")
    runner = jobs.JobRunner(ctx)
    resumed_runner.append(runner)
    assert runner.recover() == 1
    record = jobs.wait_for_job(ctx, job_id, timeout=60).record
    assert (record.state, record.done, record.added, record.failed) == ("succeeded", MEMBERS, MEMBERS, 0)
    assert get_collection(ctx, "r").index_size == MEMBERS


def test_a_job_whose_upload_is_gone_is_marked_failed_on_recover(
    ctx: AppContext, tmp_path: Path, archive: dict[str, bytes]
) -> None:
    source = upload(ctx, tmp_path, archive)
    job_id = interrupted_job(ctx, source)
    source.path.unlink()
    runner = jobs.JobRunner(ctx)
    try:
        assert runner.recover() == 0
    finally:
        runner.shutdown()
    record = jobs.get_job(ctx, job_id).record
    assert record.state == "failed" and record.finished_at is not None
    assert "source is gone" in (record.error or "")
    assert record.done == BATCH  # what it committed stays
    assert get_collection(ctx, "r").image_count == BATCH - 2


def test_recover_runs_queued_jobs_and_removes_uploads_no_job_refers_to(
    ctx: AppContext, tmp_path: Path, archive: dict[str, bytes], resumed_runner: list[jobs.JobRunner]
) -> None:
    create_collection(ctx, name="q", embedder="tiny")
    source = upload(ctx, tmp_path, archive)
    job_id = jobs.JobRunner(ctx).create_job(collection="q", source=source)  # queued, never started
    stray = ctx.settings.uploads_dir / "left-by-a-crash.archive"
    stray.write_bytes(b"PK")
    runner = jobs.JobRunner(ctx)
    resumed_runner.append(runner)
    assert runner.recover() == 1
    assert not stray.exists()
    record = jobs.wait_for_job(ctx, job_id, timeout=60).record
    assert (record.state, record.done, record.added, record.resumes) == ("succeeded", MEMBERS, ADDED, 1)
    assert list(ctx.settings.uploads_dir.iterdir()) == []


def test_the_service_resumes_an_interrupted_job_when_it_starts(
    settings: Settings, tmp_path: Path, archive: dict[str, bytes]
) -> None:
    from tests.api.test_imports import wait_for_job

    ctx = open_context(settings)
    try:
        source = upload(ctx, tmp_path, archive)
        job_id = interrupted_job(ctx, source)
    finally:
        ctx.close()
    with TestClient(create_app(settings)) as client:
        job = wait_for_job(client, job_id)
        assert job["state"] == "succeeded"
        assert (job["done"], job["added"], job["duplicates"], job["failed"]) == (MEMBERS, ADDED, 2, 3)
        report = client.get(f"/api/v1/jobs/{job_id}/report").text.splitlines()
        assert [json.loads(line)["item"] for line in report] == list(archive)
        info = client.get("/api/v1/collections/r").json()
        assert info["image_count"] == info["index_size"] == ADDED


# -- files of uncommitted batches ---------------------------------------------------------------
WRITER = """
import os, sys
from pathlib import Path
from app.data.storage import FileJournal, ImageStore

journal_dir, images_dir, orphan, known_sha, orphan_sha = sys.argv[1:]
journal = FileJournal.open(Path(journal_dir))
store = ImageStore(Path(images_dir), journal=journal)
journal.note([(known_sha, "PNG"), (orphan_sha, "PNG")])
store.put(Path(orphan).read_bytes(), sha256=orphan_sha, image_format="PNG")
# a torn write beside it, as a kill during write_atomic leaves
path = store.path_for(orphan_sha, "PNG")
(path.parent / f".{path.name}.x1y2.tmp").write_bytes(b"torn")
print("noted", flush=True)
sys.stdin.readline()  # hold the journal's lock until told to die
os._exit(9)  # die without closing anything
"""


def test_files_a_dead_writer_never_committed_are_removed_on_start(
    settings: Settings, tmp_path: Path, make_png: Callable[..., bytes]
) -> None:
    ctx = open_context(settings)
    create_collection(ctx, name="j", embedder="tiny")
    known = make_png(1)
    add_image(ctx, collection="j", data=known, name="known.png", metadata=None)
    known_path = ctx.store.path_for(sha256_hex(known), "PNG")
    ctx.close()
    orphan = make_png(2)
    (tmp_path / "orphan.png").write_bytes(orphan)
    orphan_path = ctx.store.path_for(sha256_hex(orphan), "PNG")

    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(settings.journal_dir), str(settings.images_dir)]
        + [str(tmp_path / "orphan.png"), sha256_hex(known), sha256_hex(orphan)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
    ) as writer:
        assert writer.stdin is not None and writer.stdout is not None
        try:
            assert writer.stdout.readline() == "noted\n"
            (journal,) = settings.journal_dir.glob(f"{writer.pid}-*.journal")
            # The writer is alive (holds its lock): a start leaves its files alone.
            open_context(settings).close()
            assert orphan_path.exists() and journal.exists()
        finally:
            writer.stdin.close()  # the writer dies
            writer.wait(timeout=30)
    assert writer.returncode == 9

    ctx = open_context(settings)
    try:
        assert known_path.exists()  # it has a row
        assert not orphan_path.exists()  # it never got one
        assert list(orphan_path.parent.glob("*.tmp")) == []
        assert not journal.exists()
        assert [p.name for p in settings.journal_dir.glob("*.journal")] == [ctx.store.journal.path.name]
        assert get_collection(ctx, "j").image_count == 1
    finally:
        ctx.close()


def test_a_journal_without_a_lock_holder_is_treated_as_dead(
    settings: Settings, make_png: Callable[..., bytes]
) -> None:
    """A journal file nobody has open (its process long gone) is read like one a writer left."""
    orphan = make_png(3)
    ctx = open_context(settings)
    ctx.store.put(orphan, sha256=sha256_hex(orphan), image_format="PNG")
    ctx.close()
    stale = settings.journal_dir / "12345-deadbeef.journal"
    stale.write_text(f"{sha256_hex(orphan)} PNG\nnot-a-line\n{'0' * 64} BMP\n")
    ctx = open_context(settings)
    try:
        assert not ctx.store.path_for(sha256_hex(orphan), "PNG").exists()
        assert not stale.exists()
    finally:
        ctx.close()


def test_a_batch_whose_transaction_fails_leaves_no_file(
    ctx: AppContext, make_png: Callable[..., bytes]
) -> None:
    from app.ingest.stages import resolve_target

    create_collection(ctx, name="t", embedder="tiny")
    record = resolve_target(ctx, "t").record
    data = make_png(4)
    accepted = [Accepted(0, Item("a.png", data), sha256_hex(data), "PNG", 28, 28)]

    def fail(session: object) -> None:
        raise RuntimeError("the database went away mid-commit")

    with pytest.raises(RuntimeError):
        store_accepted(
            ctx,
            record=record,
            accepted=accepted,
            vectors=None,
            results=[None],
            durable=False,
            in_transaction=fail,
        )
    assert not ctx.store.path_for(sha256_hex(data), "PNG").exists()
    assert stored_counts(ctx) == (0, 0, 0, 0)
    assert ctx.store.journal.entries() == []
    assert isinstance(ctx.store.journal, FileJournal)
