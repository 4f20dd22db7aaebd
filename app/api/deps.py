"""Typed dependencies shared by the routers."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Query, Request, UploadFile

# Re-exported: an image id is a decimal integer in 1..MAX_ID (nothing else pydantic's lax int takes).
from app.api.parameters import MAX_ID as MAX_ID
from app.api.parameters import ImageId as ImageId
from app.catalog.filters import ImageFilter, parse_filter
from app.context import AppContext
from app.core.errors import BadMetadata, EmptyUpload, InvalidRequest, PayloadTooLarge
from app.core.usertext import check_metadata, parse_json, text_problem
from app.ingest.jobs import JobRunner
from app.learning.evaluation_runs import EvaluationRunner
from app.learning.tasks import TaskRunner

CHUNK = 1024 * 1024
MAX_METADATA_CHARS = 64 * 1024


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in the
# thread pool, a hop of its own (about 0.1-0.15 ms per request here).
async def get_context(request: Request) -> AppContext:
    return request.app.state.context  # type: ignore[no-any-return]


def get_jobs(request: Request) -> JobRunner:
    return request.app.state.jobs  # type: ignore[no-any-return]


def get_evaluations(request: Request) -> EvaluationRunner:
    return request.app.state.evaluations  # type: ignore[no-any-return]


def get_tasks(request: Request) -> TaskRunner:
    return request.app.state.tasks  # type: ignore[no-any-return]


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route (and its dependencies) declares."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def reject_unknown_parameters(request: Request) -> None:
    """422 for a query parameter the route does not declare: on a filtered listing a misspelt or
    made-up filter (``filter[label]=``, ``sort=``) must not silently return everything."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    names = getattr(route, "_cbir_query_names", None)
    if names is None:  # found once per route, kept on the route (it lives as long as its app)
        names = _query_names(dependant)
        route._cbir_query_names = names  # type: ignore[union-attr]
    unknown = sorted(set(request.query_params) - names)
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter {unknown[0][:60]!r}: filter with label=, meta=KEY:VALUE and "
            "created_after= (there is no sort parameter)"
        )


async def get_image_filter(
    request: Request,
    label: Annotated[
        list[str] | None,
        Query(description="only images whose metadata label is this; repeated: is one of these"),
    ] = None,
    meta: Annotated[
        list[str] | None,
        Query(description="KEY:VALUE, repeatable: only images whose metadata KEY has this value (as text)"),
    ] = None,
    created_after: Annotated[
        str | None,
        Query(max_length=40, description="only images stored after this ISO 8601 date or date-time (UTC)"),
    ] = None,
) -> ImageFilter:
    reject_unknown_parameters(request)
    return parse_filter(label=label, meta=meta or [], created_after=created_after)


ContextDep = Annotated[AppContext, Depends(get_context)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]
TasksDep = Annotated[TaskRunner, Depends(get_tasks)]
EvaluationsDep = Annotated[EvaluationRunner, Depends(get_evaluations)]
FilterDep = Annotated[ImageFilter, Depends(get_image_filter)]


async def read_upload(upload: UploadFile, *, limit: int) -> bytes:
    """The whole upload, refusing more than ``limit`` bytes without reading further."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the file is larger than the {limit}-byte limit (CBIR_MAX_UPLOAD_BYTES)")
        chunks.append(chunk)
    if size == 0:
        raise EmptyUpload(f"the uploaded file {upload.filename!r} is empty")
    return b"".join(chunks)


def parse_metadata(raw: str | None) -> dict[str, Any]:
    """An upload's ``metadata`` part: a JSON object that obeys app/core/usertext.py (422
    ``bad_metadata`` otherwise), ``invalid_request`` for text that is not a JSON object."""
    if raw is None or raw.strip() == "":
        return {}
    if (problem := text_problem(raw)) is not None:  # bytes that are not UTF-8 (app/api/forms.py)
        raise BadMetadata(f"the metadata part {problem}")
    if len(raw) > MAX_METADATA_CHARS:  # before parsing: the size bounds the parser's work
        raise InvalidRequest("metadata must be at most 64 KiB of JSON")
    try:
        value = parse_json(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"metadata must be a JSON object: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"metadata must be a JSON object, not {type(value).__name__}")
    return check_metadata(value)
