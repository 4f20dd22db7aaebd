from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.access.keys import Scope
from app.api import job_access, security
from app.api.deps import CHUNK, ContextDep, JobsDep, TasksDep
from app.api.forms import Utf8FormRoute
from app.api.presenters import job_out
from app.api.schemas import DatasetImport, JobAccepted, JobList, JobOut
from app.catalog.collections import get_collection
from app.context import AppContext
from app.core.errors import BadMultipart, EmptyUpload, InvalidRequest, PayloadTooLarge, UnsupportedArchive
from app.core.redaction import scrub_report
from app.ingest import jobs
from app.ingest.sources.base import Limits, Source
from app.ingest.sources.choose import SourceRequest, choose_source
from app.ingest.sources.manifests import MAX_MANIFEST_BYTES
from app.learning.tasks import KINDS as TASK_KINDS

# Utf8FormRoute: a form part or file name that is not UTF-8 is refused, never read as Latin-1.
router = APIRouter(tags=["imports"], route_class=Utf8FormRoute)
# Imports and embedder switches (app/ingest/jobs.py), evaluations, whitening and near-duplicate
# runs (tasks.py).
JobKind = Literal["import", "reembed", "evaluate", "whiten", "duplicates"]

IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "zip or tar"},
                        "manifest": {
                            "type": "string",
                            "format": "binary",
                            "description": "optional CSV or JSON lines naming members and their metadata "
                            "(else manifest.csv or manifest.jsonl inside the archive, if any)",
                        },
                    },
                }
            },
            "application/json": {"schema": DatasetImport.model_json_schema()},
        },
    }
}


@router.post(
    "/collections/{name}/imports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    openapi_extra=IMPORT_BODY,
)
async def start_import(name: str, request: Request, ctx: ContextDep, runner: JobsDep) -> JobAccepted:
    """Bulk import: a zip/tar of images (parent folder = label), or as JSON a built-in dataset or a
    server folder under CBIR_IMPORT_ROOTS (subfolder = label; links out of the folder skipped), or
    {"urls": [...]}: images fetched from public http(s) hosts only, each reported in the job."""
    await run_in_threadpool(get_collection, ctx, name)  # 404 before reading a large body
    ctx.store.gate.check()  # 503 read_only before receiving an archive that could not be stored
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = DatasetImport.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidRequest(
                f'expected {{"dataset": "mnist", "split": "train"}}: {exc.errors()[0]["msg"]}'
            ) from None
        wanted = SourceRequest.named(
            dataset=body.dataset,
            split=body.split,
            folder=body.folder,
            root=body.root,
            path=body.path,
            layout=body.layout,
            manifest=body.manifest,
            urls=body.urls,
        )
        if wanted.reads_server_files:
            # the server's own files: an admin key (even before any key exists; CBIR_AUTH=off
            # lifts it), checked before any path is looked at
            security.require(
                request, Scope.admin, what="importing a server folder or manifest", even_keyless=True
            )
        source: Source = await run_in_threadpool(
            choose_source, wanted, settings=ctx.settings, roots=ctx.settings.import_root_paths
        )
    elif content_type.startswith("multipart/form-data"):
        source = await _receive_archive(request, ctx)
    else:
        raise UnsupportedArchive(
            "send a zip or tar archive as multipart/form-data in the field 'file', "
            'or JSON {"dataset": "mnist", "split": "train"} or {"folder": "/path/under/an/import/root"}'
        )
    try:
        job_id = await run_in_threadpool(
            runner.submit_import, collection=name, source=source, creator=job_access.creator(request)
        )
    except BaseException:
        for path in jobs.uploads_of(source):  # the collection went away meanwhile, or the database
            path.unlink(missing_ok=True)
        raise
    return JobAccepted(job_id=job_id, state="queued", status_url=f"/api/v1/jobs/{job_id}")


async def _receive_archive(request: Request, ctx: AppContext) -> Source:
    """Stream the multipart archive (and optional manifest) to disk, never whole in memory, and
    keep them in the uploads folder until the job ends (so an interrupted job can resume)."""
    limit = ctx.settings.max_archive_bytes
    try:
        form = await request.form(max_files=2, max_fields=10)
    except StarletteHTTPException as exc:  # a malformed body, or more parts than allowed
        raise BadMultipart(f"{exc.detail}; send one archive in 'file' (and at most one 'manifest')") from None
    kept: list[Path] = []
    try:
        if len(form.getlist("file")) > 1 or len(form.getlist("manifest")) > 1:
            raise BadMultipart("send one archive in 'file' (and at most one 'manifest')")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("the multipart body needs a 'file' field holding a zip or tar archive")
        filename = upload.filename or "upload"
        archive = await _save(upload, ctx, limit=limit, what=f"the archive {filename!r}", suffix=".archive")
        kept.append(archive)
        manifest = manifest_name = None
        extra = form.get("manifest")
        if extra is not None and not isinstance(extra, str):
            manifest_name = extra.filename  # messages name the file sent, never the temporary one
            manifest = await _save(
                extra,
                ctx,
                limit=MAX_MANIFEST_BYTES,
                what=f"the manifest {manifest_name!r}",
                suffix=".manifest",
            )
            kept.append(manifest)
        wanted = SourceRequest(
            archive=archive,
            archive_name=filename,
            archive_manifest=manifest,
            archive_manifest_name=manifest_name,
        )
        return await run_in_threadpool(
            choose_source,
            wanted,
            settings=ctx.settings,
            roots=ctx.settings.import_root_paths,
            limits=Limits.of(ctx.settings),
        )
    except BaseException:
        for path in kept:
            path.unlink(missing_ok=True)
        raise
    finally:
        await form.close()


async def _save(upload: Any, ctx: AppContext, *, limit: int, what: str, suffix: str) -> Path:
    tmp_dir = ctx.settings.tmp_dir
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="import-", suffix=suffix)
    path = Path(name)
    try:
        with open(fd, "wb") as handle:
            size = 0
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"{what} is larger than {limit} bytes")
                handle.write(chunk)
        if size == 0:
            raise EmptyUpload(f"{what} is empty")
        return jobs.keep_upload(ctx, path, suffix=suffix)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@router.get("/jobs", response_model=JobList, responses={404: {"description": "No such collection"}})
def list_jobs(
    request: Request,
    ctx: ContextDep,
    collection: str | None = Query(None, description="only this collection's jobs"),
    state: str | None = Query(None, description="queued, running, succeeded or failed"),
    kind: Annotated[list[JobKind] | None, Query(description="only jobs of these kinds (repeatable)")] = None,
    limit: int = Query(20, ge=1, le=200),
    errors: int = Query(20, ge=0, le=1000, description="per-item errors shown per job (GET /jobs/{id}: all)"),
) -> JobList:
    """The newest jobs first."""
    infos = jobs.list_jobs(ctx, collection=collection, state=state, kinds=list(kind or ()), limit=limit)
    viewer = _viewer(request, ctx)
    return JobList(jobs=[job_out(info, viewer=viewer, max_errors=errors) for info in infos])


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request, ctx: ContextDep) -> JobOut:
    """A job; its server paths are shown to admin keys, its per-item errors to keys with at least
    the scope of the key that started it."""
    return job_out(jobs.get_job(ctx, job_id), viewer=_viewer(request, ctx))


def _viewer(request: Request, ctx: AppContext) -> job_access.Viewer:
    return job_access.viewer(request, roots=ctx.settings.import_root_map)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, request: Request, ctx: ContextDep, runner: JobsDep, tasks: TasksDep) -> JobOut:
    """Stop a queued or running import after its current batch (what it stored stays), or an
    evaluate or whiten job within about a second; 409 when it has already ended. Needs the scope
    of the key that started the job."""
    record = jobs.get_job(ctx, job_id).record  # 404 for an unknown job
    job_access.require_details(request, record, what=f"cancelling job {job_id}")
    info = tasks.cancel(job_id) if record.kind in TASK_KINDS else runner.cancel(job_id)
    return job_out(info, viewer=_viewer(request, ctx))


@router.get(
    "/jobs/{job_id}/report",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def job_report(job_id: str, request: Request, ctx: ContextDep) -> Response:
    """Every file the job has handled so far, one JSON object per line: item, status (added,
    duplicate, rejected), code (the reason of a rejection), detail, image_id. Needs the scope of
    the key that started the job."""
    record = jobs.get_job(ctx, job_id).record  # 404 for an unknown job
    job_access.require_details(request, record, what=f"the report of job {job_id}")
    committed = record.cursor
    path = jobs.report_path(ctx, job_id)
    try:
        # A running job appends (and after a restart cuts back) its report: send the bytes there
        # are now, never a length that changes under the response.
        body = path.read_bytes()
    except FileNotFoundError:
        body = b""
    # A batch's lines are written just before its transaction commits: lines beyond the job's
    # cursor (read first) are not acknowledged yet, and a crash would take them back.
    parts = body.split(b"\n", committed)
    if len(parts) > committed:
        body = body[: len(body) - len(parts[-1])]
    return Response(
        content=scrub_report(body[: body.rfind(b"\n") + 1]),  # whole lines only; URLs redacted
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="import-{job_id}.jsonl"'},
    )


@router.get("/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, ctx: ContextDep, request: Request) -> StreamingResponse:
    """Server-sent events: a ``progress`` event (the job as JSON) whenever it changes, then ``end``
    when it finishes. Needs the scope of the key that started the job."""
    first = await run_in_threadpool(jobs.get_job, ctx, job_id)  # 404 before the stream starts
    job_access.require_details(request, first.record, what=f"the events of job {job_id}")
    viewer = _viewer(request, ctx)

    async def stream() -> AsyncIterator[str]:
        last = None
        while True:
            info = await run_in_threadpool(jobs.get_job, ctx, job_id)
            body = job_out(info, viewer=viewer).model_dump_json()
            if body != last:
                last = body
                yield f"event: progress\ndata: {body}\n\n"
            if info.record.state in jobs.FINAL_STATES:
                yield f"event: end\ndata: {body}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_INTERVAL_S)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


EVENT_INTERVAL_S = 0.5
