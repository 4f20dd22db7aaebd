"""Admission control: at most ``CBIR_MAX_PENDING_EMBEDS`` uploads and searches in progress.

One more is refused at once with 503 ``overloaded`` and ``Retry-After``, instead of queueing for
a thread and the CPU until the client times out. Pure ASGI, before the body is read: a refusal
costs no multipart parsing and no thread, so it stays fast exactly when the server is busiest.
Bulk imports are not counted: their pipeline has its own bounded queues.
"""

from __future__ import annotations

import re

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.problems import problem
from app.core.errors import Overloaded
from app.metrics.instruments import note_refusal

# The requests that decode and embed images: upload, search (one query or a batch), compare.
EMBEDDING_REQUESTS = re.compile(r"^/api/v1/collections/[^/]+/(images|search|search/batch|compare)$")
RETRY_AFTER_S = 1


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0  # only the event loop's thread touches it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        embeds = scope["type"] == "http" and scope["method"] == "POST"
        if not (embeds and EMBEDDING_REQUESTS.match(get_route_path(scope))):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            refusal = Overloaded(
                f"{self.limit} uploads and searches are already in progress (CBIR_MAX_PENDING_EMBEDS); "
                "retry shortly"
            )
            response = problem(
                status=refusal.status,
                title=refusal.title,
                detail=refusal.detail,
                code=refusal.code,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
            note_refusal(scope, "pending_embeds")
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
