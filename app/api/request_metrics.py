"""Request metrics: every HTTP answer counted and timed by route template, method and status.

Outermost (inside Starlette's last-resort error handler), so refusals by the inner layers (413 of
the body limits, 401/403/429 of the access checks, 503 of admission) are counted under the route
they were meant for. The route is found as the access checks find it, from the route table: its
template (``/api/v1/collections/{name}/search``), never the path a client sent; a path no route
matches is ``unmatched``, a static file ``/static/{path}``. The instruments are the application
context's (``ctx.metrics``): requests before the lifespan has opened it are not counted.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.routing import Mount, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import security
from app.metrics.instruments import REFUSAL, Metrics

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    def __init__(self, app: ASGIApp, *, service: FastAPI) -> None:
        self.app = app
        self.service = service
        self._rules: list[security.RouteRule] | None = None
        self._mounts: list[str] = []
        self._seen: security.PathMemo[str] = security.PathMemo()  # (path, method) -> template

    def _metrics(self) -> Metrics | None:
        context = getattr(self.service.state, "context", None)
        return getattr(context, "metrics", None)

    def route_of(self, path: str, method: str) -> str:
        return self._seen.get(path, method, lambda: self._work_out(path, method))

    def _work_out(self, path: str, method: str) -> str:
        if self._rules is None:  # on the first request, once every route is registered
            self._rules = security.route_rules(self.service)
            self._mounts = [route.path for route in self.service.routes if isinstance(route, Mount)]
        template = next((rule.path for rule in self._rules if rule.matches(path, method)), None)
        if template is None:  # a known path with another method: its 405 goes under the route
            template = next((rule.path for rule in self._rules if rule.regex.match(path)), None)
        if template is None:
            mount = next((m for m in self._mounts if path.startswith(m + "/")), None)
            template = f"{mount}/{{path}}" if mount is not None else UNMATCHED
        return template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self._metrics() if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # Before the call: a mount rewrites the scope's root_path on the way in.
        route, method = self.route_of(get_route_path(scope), scope["method"]), scope["method"]
        status = 500  # what the client gets when no answer started before an error

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            metrics.request(
                route=route,
                method=method if method in METHODS else "other",
                status=status,
                seconds=time.perf_counter() - started,
            )
            if (reason := scope.get(REFUSAL)) is not None:
                metrics.refused(reason)


def install(app: FastAPI) -> None:
    """Add the middleware; call it after every other middleware, so that it is the outermost."""
    app.add_middleware(RequestMetrics, service=app)
