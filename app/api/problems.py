"""One exception handler: every error becomes ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import CbirError, DatabaseUnavailable, DecodeMemoryFull
from app.data import db, storage
from app.data.db import is_unavailable
from app.metrics.instruments import note_refusal

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"


def problem(
    *,
    status: int,
    title: str,
    detail: str,
    code: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, object] | None = None,
) -> JSONResponse:
    """``extra``: extension members (RFC 9457 section 3.2) a client can act on, e.g. the sample
    that fits of an ``over_budget``; they never replace the standard members."""
    body = {**(extra or {}), "type": "about:blank", "title": title, "status": status, "detail": detail}
    body["code"] = code
    # nosniff here too: a 500 is sent from outside every middleware (app/api/headers.py).
    headers = {"X-Content-Type-Options": "nosniff", **(headers or {})}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


def _render(exc: CbirError) -> JSONResponse:
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    if getattr(exc, "headers", None):  # e.g. WWW-Authenticate of a 401, Retry-After of a 429
        headers = {**(headers or {}), **exc.headers}  # type: ignore[attr-defined]
    return problem(
        status=exc.status, title=exc.title, detail=exc.detail, code=exc.code, headers=headers, extra=exc.extra
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(CbirError)
    async def _cbir(request: Request, exc: CbirError) -> JSONResponse:
        if isinstance(exc, DecodeMemoryFull):
            note_refusal(request.scope, "decode_memory")
        return _render(exc)

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        fault = db.storage_fault(exc)  # its disk full (507) or read-only (503)
        if fault is not None:
            log.error("database write refused on %s %s: %s", request.method, request.url.path, exc)
            return _render(fault)
        if not is_unavailable(exc):
            raise exc  # a bug, not an outage: the 500 handler below logs it with its traceback
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return _render(
            DatabaseUnavailable("the database is unreachable or dropped the connection; retry shortly")
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(
            status=422, title="Invalid request", detail=_validation_detail(exc), code="invalid_request"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 400s here come from parsing the body (a malformed multipart, too many parts).
        titles = {
            400: "Bad request",
            404: "Not found",
            405: "Method not allowed",
            413: "Request body too large",
        }
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return problem(
            status=exc.status_code,
            title=titles.get(exc.status_code, "Error"),
            detail=str(exc.detail),
            code=codes.get(exc.status_code, "http_error"),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_problem(request, exc)


def unexpected_problem(request: Request, exc: Exception) -> JSONResponse:
    """The answer to an error no handler knows: 507 or 503 for a full or read-only disk, else a
    500 (logged here with its traceback). Used by app/api/failsafe.py and as Starlette's last
    handler."""
    fault = storage.storage_fault(exc)  # a full or read-only disk under any write path
    if fault is not None:
        log.error("storage refused a write on %s %s: %s", request.method, request.url.path, exc)
        return _render(fault)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(
        status=500,
        title="Internal server error",
        detail="the server failed to handle this request; it has been logged",
        code="internal_error",
    )
