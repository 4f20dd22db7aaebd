from __future__ import annotations

from fastapi import APIRouter, Response, status

from app import __version__
from app.api import security
from app.api.deps import ContextDep
from app.api.schemas import CollectionHealth, Health, IndexProblemOut, Readiness, RuntimeOut
from app.catalog.collections import list_collections

router = APIRouter(tags=["health"])


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "an index is being built from the database"}},
    openapi_extra=security.PUBLIC,
)
def ready(ctx: ContextDep, response: Response) -> Readiness:
    """Readiness: startup recovery is done (requests are only served after it) and no collection's
    searches answer 503 index_rebuilding. ``problems`` lists what stored rows or settings keep an
    index from serving (set aside at the start, never fatal) and what to do. Liveness is /health."""
    rebuilding = ctx.indexes.unavailable()
    if rebuilding:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "2"
    problems = [IndexProblemOut.of(p) for p in ctx.indexes.problems.all()]
    return Readiness(ready=not rebuilding, rebuilding=rebuilding, problems=problems)


@router.get("/health", response_model=Health, openapi_extra=security.PUBLIC)
def health(ctx: ContextDep) -> Health:
    collections = [  # first: opening an index may find a problem
        CollectionHealth(name=c.name, images=c.image_count, indexed=c.index_size)
        for c in list_collections(ctx)
    ]
    degraded = [
        name
        for name, on in (
            ("checkpoint_failed", bool(ctx.indexes.checkpoint_errors())),
            ("read_only", ctx.store.gate.closed),
        )
        if on
    ]
    degraded += sorted({p.code for p in ctx.indexes.problems.all()})
    return Health(
        status="degraded" if degraded else "ok",
        version=__version__,
        device=ctx.device.type,
        collections=collections,
        degraded=degraded,
        runtimes=[RuntimeOut.model_validate(row) for row in ctx.embedders.runtimes()],
    )
