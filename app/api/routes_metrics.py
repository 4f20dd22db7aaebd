"""``GET /metrics``: the service's metrics in the Prometheus text format (docs/api.md, "Metrics").

While API keys are enforced it needs a key with the read scope (even with CBIR_SEARCH_REQUIRES_KEY
off); CBIR_METRICS_PUBLIC=true opens it to a scraper on a private network. Not in the OpenAPI
document, which describes the JSON API.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.access.keys import Scope
from app.api import security
from app.api.deps import ContextDep
from app.core.settings import Settings


def router(settings: Settings) -> APIRouter:
    public = settings.metrics_public
    metrics_router = APIRouter(tags=["metrics"])

    # A plain def: the scrape reads the database (app/metrics/state.py), so it runs in the pool.
    @metrics_router.get(
        "/metrics",
        include_in_schema=False,
        response_class=Response,
        openapi_extra=security.PUBLIC if public else security.READ,
    )
    def metrics(request: Request, ctx: ContextDep) -> Response:
        if not public:  # the access checks let keyless reads through unless CBIR_SEARCH_REQUIRES_KEY
            security.require(request, Scope.read, what="GET /metrics")
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics_router
