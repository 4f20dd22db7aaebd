"""Background import jobs: state in the database, work on one writer thread."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select, update

from app.context import AppContext
from app.datasets import DATASETS, load_mnist
from app.errors import FolderNotAllowed, InvalidRequest, JobFinished, JobNotFound, UnsupportedArchive
from app.records import JobRecord, utcnow
from app.services.collections import require_collection
from app.services.ingest import Item, ItemResult, ingest_batch

log = logging.getLogger(__name__)

BATCH_SIZE = 512
MAX_REPORTED_ERRORS = 1000
SKIPPED_FOLDER = "__MACOSX"


@dataclass(frozen=True)
class ArchiveSource:
    path: Path  # a zip or tar file in the data folder's tmp/, deleted when the job ends
    filename: str


@dataclass(frozen=True)
class DatasetSource:
    dataset: str
    split: str


@dataclass(frozen=True)
class FolderSource:
    path: Path  # a resolved folder on this machine; subfolder names become labels


Source = ArchiveSource | DatasetSource | FolderSource


def check_folder(path: Path, *, roots: list[Path] | None = None) -> FolderSource:
    """A folder to import; with ``roots`` (imports over HTTP) it must lie inside one of them once
    links are resolved, so neither ``..`` nor a symlink can reach outside."""
    if roots is not None:
        if not roots:
            raise FolderNotAllowed("importing server folders is off: set CBIR_IMPORT_ROOTS to allow some")
        if not path.is_absolute():
            raise InvalidRequest(f"give an absolute folder path under {', '.join(map(str, roots))}")
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # missing, a link loop, a NUL byte
            resolved = None
        if resolved is None or not any(resolved.is_relative_to(root) for root in roots):
            # the same answer whether it exists or not: the API does not probe the file system
            raise FolderNotAllowed(
                f"{str(path)[:200]!r} is not a folder under the allowed roots ({', '.join(map(str, roots))})"
            )
        path = resolved
    if not path.is_dir():
        raise InvalidRequest(f"{str(path)[:200]!r} is not a folder")
    return FolderSource(path.resolve())


def check_dataset(dataset: str, split: str) -> DatasetSource:
    if dataset not in DATASETS:
        raise InvalidRequest(f"unknown dataset {dataset!r}; built-in datasets: {sorted(DATASETS)}")
    if split not in DATASETS[dataset]:
        raise InvalidRequest(f"dataset {dataset!r} has splits {list(DATASETS[dataset])}, not {split!r}")
    return DatasetSource(dataset, split)


def check_archive(path: Path, filename: str) -> ArchiveSource:
    if not (zipfile.is_zipfile(path) or _is_tar(path)):
        raise UnsupportedArchive(f"{filename!r} is not a zip or tar archive (tar.gz and tar.bz2 are fine)")
    return ArchiveSource(path, filename)


def _is_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*"):
            return True
    except (tarfile.TarError, OSError, EOFError):
        return False


# -- sources as item streams ----------------------------------------------------------------
def _label_from(name: str) -> dict[str, Any]:
    parts = PurePosixPath(name).parts
    return {"label": parts[-2]} if len(parts) >= 2 else {}


def _member_ok(name: str) -> str | None:
    """None when the member name is acceptable, else a reason code."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return "unsafe_path"
    return None


def _skipped(name: str) -> bool:
    """macOS forks and hidden files or folders. Judged per path part, so "./cat/1.png" (tar of
    ".") is kept and "../evil.png" is left for ``_member_ok`` to reject."""
    parts = PurePosixPath(name).parts  # "." parts are dropped here, ".." parts kept
    return not parts or parts[0] == SKIPPED_FOLDER or any(p.startswith(".") and p != ".." for p in parts)


def iter_archive(source: ArchiveSource, *, max_member_bytes: int) -> Iterator[Item | ItemResult]:
    """Regular-file members as Items (label = parent folder); bad members as rejected results.

    Members are read one by one, never extracted to disk.
    """
    if zipfile.is_zipfile(source.path):
        with zipfile.ZipFile(source.path) as archive:
            for info in archive.infolist():
                if info.is_dir() or _skipped(info.filename):
                    continue
                if reason := _member_ok(info.filename):
                    yield ItemResult(info.filename, "rejected", code=reason, detail="path leaves the archive")
                elif info.file_size > max_member_bytes:
                    yield ItemResult(
                        info.filename,
                        "rejected",
                        code="image_too_large",
                        detail=f"{info.file_size} bytes; the limit is {max_member_bytes}",
                    )
                else:
                    try:
                        data = archive.read(info)
                    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                        yield ItemResult(
                            info.filename, "rejected", code="archive_member_unreadable", detail=str(exc)
                        )
                        continue
                    yield Item(info.filename, data, _label_from(info.filename))
        return
    with tarfile.open(source.path, "r:*") as archive:
        for member in archive:
            if member.isdir() or _skipped(member.name):
                continue
            if not member.isfile():
                yield ItemResult(
                    member.name,
                    "rejected",
                    code="not_a_regular_file",
                    detail="links and device files are not imported",
                )
            elif reason := _member_ok(member.name):
                yield ItemResult(member.name, "rejected", code=reason, detail="path leaves the archive")
            elif member.size > max_member_bytes:
                yield ItemResult(
                    member.name,
                    "rejected",
                    code="image_too_large",
                    detail=f"{member.size} bytes; the limit is {max_member_bytes}",
                )
            else:
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                try:
                    data = handle.read()
                except (tarfile.TarError, OSError, EOFError) as exc:
                    yield ItemResult(
                        member.name, "rejected", code="archive_member_unreadable", detail=str(exc)
                    )
                    return  # a broken stream cannot be read past
                yield Item(member.name, data, _label_from(member.name))


def _folder_files(source: FolderSource) -> Iterator[tuple[str, Path]]:
    """(relative name, path) of the folder's files in name order; hidden entries skipped, and
    links that lead outside the folder never followed."""
    for path in sorted(source.path.rglob("*")):
        name = path.relative_to(source.path).as_posix()
        if _skipped(name) or path.is_dir():
            continue
        yield name, path


def iter_folder(source: FolderSource, *, max_member_bytes: int) -> Iterator[Item | ItemResult]:
    """The folder's files as Items (label = parent folder, relative path as name)."""
    for name, path in _folder_files(source):
        try:
            real = path.resolve(strict=True)
            if not real.is_relative_to(source.path) or not real.is_file():
                yield ItemResult(name, "rejected", code="not_a_regular_file", detail="link out of the folder")
                continue
            size = real.stat().st_size
            if size > max_member_bytes:
                yield ItemResult(
                    name,
                    "rejected",
                    code="image_too_large",
                    detail=f"{size} bytes; the limit is {max_member_bytes}",
                )
                continue
            data = real.read_bytes()
        except OSError as exc:
            yield ItemResult(name, "rejected", code="file_unreadable", detail=str(exc))
            continue
        yield Item(name, data, _label_from(name))


def report_path(ctx: AppContext, job_id: str) -> Path:
    """The job's per-file report: one JSON object per line (item, status, code, detail, image_id)."""
    return ctx.settings.data_dir / "reports" / f"{job_id}.jsonl"


def _append_report(path: Path, results: list[ItemResult]) -> None:
    lines = [
        json.dumps(
            {"item": r.name, "status": r.status, "code": r.code, "detail": r.detail, "image_id": r.image_id},
            ensure_ascii=False,
        )
        for r in results
    ]
    if lines:
        with path.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


def count_archive(source: ArchiveSource) -> int | None:
    try:
        if zipfile.is_zipfile(source.path):
            with zipfile.ZipFile(source.path) as archive:
                return sum(1 for i in archive.infolist() if not i.is_dir() and not _skipped(i.filename))
        with tarfile.open(source.path, "r:*") as archive:
            return sum(1 for m in archive if not m.isdir() and not _skipped(m.name))
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError):
        return None


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def iter_dataset(ctx: AppContext, source: DatasetSource) -> Iterator[Item]:
    images, labels = load_mnist(
        source.split, datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir / "datasets"
    )
    for i in range(len(images)):
        yield Item(
            f"{source.dataset}-{source.split}-{i:05d}.png",
            png_bytes(images[i]),
            {"label": str(int(labels[i])), "dataset": source.dataset, "split": source.split, "index": i},
        )


def dataset_size(ctx: AppContext, source: DatasetSource) -> int:
    images, _ = load_mnist(
        source.split, datasets_dir=ctx.settings.datasets_dir, download_dir=ctx.settings.data_dir / "datasets"
    )
    return len(images)


# -- jobs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobInfo:
    record: JobRecord
    collection: str | None
    images_per_second: float | None


def _source_params(source: Source) -> dict[str, Any]:
    if isinstance(source, DatasetSource):
        return {"source": "dataset", "dataset": source.dataset, "split": source.split}
    if isinstance(source, FolderSource):
        return {"source": "folder", "path": str(source.path)}
    return {"source": "archive", "filename": source.filename}


class JobRunner:
    """Runs import jobs one at a time in a background thread; progress is written to the DB."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-job")
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()

    def recover(self) -> int:
        """Mark jobs that a previous process left running as failed (their stored images are kept)."""
        with self.ctx.db.transaction() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.state.in_(("queued", "running")))
                .values(
                    state="failed",
                    finished_at=utcnow(),
                    error="interrupted by a restart; run the import again: images already stored "
                    "are recognised by content and skipped as duplicates",
                )
            )
        return result.rowcount or 0

    def create_job(self, *, collection: str, source: Source) -> str:
        job_id = uuid.uuid4().hex
        with self.ctx.db.transaction() as session:
            record = require_collection(session, collection)
            session.add(
                JobRecord(id=job_id, collection_id=record.id, kind="import", params=_source_params(source))
            )
        return job_id

    def submit_import(self, *, collection: str, source: Source) -> str:
        """Record a queued job and run it in the background; returns its id at once."""
        job_id = self.create_job(collection=collection, source=source)
        self._executor.submit(self.run_import, job_id=job_id, collection=collection, source=source)
        return job_id

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def run_import(
        self,
        *,
        job_id: str,
        collection: str,
        source: Source,
        on_progress: Callable[[dict[str, int], int | None], None] | None = None,
    ) -> None:
        ctx = self.ctx
        if self._cancel_requested(job_id):  # cancelled while queued
            if isinstance(source, ArchiveSource):
                source.path.unlink(missing_ok=True)
            return
        try:
            if isinstance(source, DatasetSource):
                total: int | None = dataset_size(ctx, source)
                stream: Iterator[Item | ItemResult] = iter_dataset(ctx, source)
            elif isinstance(source, FolderSource):
                total = sum(1 for _ in _folder_files(source))
                stream = iter_folder(source, max_member_bytes=ctx.settings.max_upload_bytes)
            else:
                total = count_archive(source)
                stream = iter_archive(source, max_member_bytes=ctx.settings.max_upload_bytes)
            self._update(job_id, state="running", started_at=utcnow(), total=total)
            counts = {"done": 0, "added": 0, "duplicates": 0, "failed": 0}
            errors: list[dict[str, Any]] = []
            batch: list[Item] = []
            pending: list[ItemResult] = []

            report = report_path(ctx, job_id)
            report.parent.mkdir(parents=True, exist_ok=True)

            def flush() -> None:
                results = pending + (
                    ingest_batch(ctx, collection=collection, items=batch, durable=False) if batch else []
                )
                _append_report(report, results)
                for result in results:
                    counts["done"] += 1
                    if result.status == "added":
                        counts["added"] += 1
                    elif result.status == "duplicate":
                        counts["duplicates"] += 1
                    else:
                        counts["failed"] += 1
                        if len(errors) < MAX_REPORTED_ERRORS:
                            errors.append({"item": result.name, "code": result.code, "detail": result.detail})
                batch.clear()
                pending.clear()
                self._update(job_id, errors=list(errors), **counts)
                if on_progress:
                    on_progress(counts, total)

            for entry in stream:
                (batch if isinstance(entry, Item) else pending).append(entry)  # type: ignore[arg-type]
                if len(batch) + len(pending) >= BATCH_SIZE:
                    flush()
                    if self._cancel_requested(job_id):
                        break
            else:
                flush()
            if self._cancel_requested(job_id):
                with ctx.db.session() as session:
                    ctx.indexes.flush(require_collection(session, collection).id)
                self._update(job_id, state="cancelled", finished_at=utcnow())
                return
            with ctx.db.session() as session:
                ctx.indexes.flush(require_collection(session, collection).id)
            self._update(job_id, state="succeeded", finished_at=utcnow(), total=counts["done"])
        except Exception as exc:
            log.exception("import job %s failed", job_id)
            self._update(job_id, state="failed", finished_at=utcnow(), error=f"{type(exc).__name__}: {exc}")
        finally:
            if isinstance(source, ArchiveSource):
                source.path.unlink(missing_ok=True)

    def cancel(self, job_id: str) -> JobInfo:
        """Ask a queued or running job to stop after its current batch; what it stored stays."""
        info = get_job(self.ctx, job_id)
        if info.record.state in FINAL_STATES:
            raise JobFinished(f"job {job_id} has already {info.record.state}; there is nothing to cancel")
        with self._lock:
            self._cancelled.add(job_id)
        if info.record.state == "queued":  # it may never start: mark it now, the worker skips it
            self._update(job_id, state="cancelled", finished_at=utcnow())
        return get_job(self.ctx, job_id)

    def _cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def _update(self, job_id: str, **values: Any) -> None:
        with self.ctx.db.transaction() as session:
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(**values))


JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def get_job(ctx: AppContext, job_id: str) -> JobInfo:
    from app.records import CollectionRecord

    with ctx.db.session() as session:
        row = session.execute(
            select(JobRecord, CollectionRecord.name)
            .outerjoin(CollectionRecord, CollectionRecord.id == JobRecord.collection_id)
            .where(JobRecord.id == job_id)
        ).first()
    if row is None:
        raise JobNotFound(f"there is no job with id {job_id!r}")
    return _job_info(*row)


def list_jobs(
    ctx: AppContext, *, collection: str | None = None, state: str | None = None, limit: int = 20
) -> list[JobInfo]:
    """The newest jobs first, optionally of one collection and in one state."""
    from app.records import CollectionRecord

    if state is not None and state not in JOB_STATES:
        raise InvalidRequest(f"state must be one of {', '.join(JOB_STATES)}, not {state[:40]!r}")
    with ctx.db.session() as session:
        stmt = select(JobRecord, CollectionRecord.name).outerjoin(
            CollectionRecord, CollectionRecord.id == JobRecord.collection_id
        )
        if collection is not None:
            stmt = stmt.where(JobRecord.collection_id == require_collection(session, collection).id)
        if state is not None:
            stmt = stmt.where(JobRecord.state == state)
        rows = session.execute(stmt.order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit)).all()
    return [_job_info(record, name) for record, name in rows]


def _job_info(record: JobRecord, name: str | None) -> JobInfo:
    rate = None
    if record.started_at is not None:
        end = record.finished_at or utcnow()
        started = record.started_at
        if started.tzinfo is None:  # SQLite returns naive UTC
            end = end.replace(tzinfo=None)
        seconds = max((end - started).total_seconds(), 1e-6)
        rate = round(record.done / seconds, 1)
    return JobInfo(record=record, collection=name, images_per_second=rate)


def wait_for_job(ctx: AppContext, job_id: str, *, timeout: float = 600.0) -> JobInfo:
    """Poll until the job ends (CLI and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        info = get_job(ctx, job_id)
        if info.record.state in ("succeeded", "failed") or time.monotonic() > deadline:
            return info
        time.sleep(0.1)
