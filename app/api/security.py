"""Access control: API keys with scopes and a rate limit per key, decided from the route table.

Every route needs a scope, found once from the route itself: an explicit mark in its
``openapi_extra`` (``PUBLIC``, ``READ``, ``ADMIN``), else by method: GET and HEAD need ``read``,
everything else ``write``; pages (GETs outside /api) are public. A new route is therefore
covered without anyone remembering to protect it. The check runs in an ASGI middleware, before a
request body is read, so an unauthenticated upload costs no disk or memory.

``read`` routes need a key only when ``CBIR_SEARCH_REQUIRES_KEY`` is on. Whether keys are enforced
at all follows ``CBIR_AUTH`` (auto: once a key exists or CBIR_API_KEYS is set).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, compile_path, get_route_path
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from app.access.keys import KeyRing, Principal, Scope, parse_config_keys
from app.api.exposure import exposure, log_refusing, refusal
from app.api.problems import problem
from app.core.errors import CbirError, DatabaseUnavailable, Forbidden, RateLimited, Unauthorized
from app.core.settings import Settings
from app.data.db import Database
from app.metrics.instruments import note_refusal

KEY_HEADER = "X-API-Key"
SCHEME = "APIKeyHeader"
MARK = "x-scope"  # the openapi_extra member that sets a route's scope; also shown in the schema
ACCESS = "cbir.access"  # where the middleware leaves its decision in the ASGI scope
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

PUBLIC: dict[str, Any] = {MARK: "public"}
READ: dict[str, Any] = {MARK: Scope.read.name}
WRITE: dict[str, Any] = {MARK: Scope.write.name}
ADMIN: dict[str, Any] = {MARK: Scope.admin.name}


def required_scope(route: BaseRoute, *, path: str, methods: set[str] | frozenset[str]) -> Scope | None:
    """The scope a route needs (None: public); ``path`` is its full path, prefixes included."""
    mark = (route.openapi_extra or {}).get(MARK) if isinstance(route, APIRoute) else None
    if mark is not None:
        return None if mark == "public" else Scope[mark]
    if methods <= SAFE_METHODS:
        # Pages, the OpenAPI document and the docs are public; API reads need the read scope.
        return Scope.read if isinstance(route, APIRoute) and path.startswith("/api/") else None
    return Scope.write


@dataclass(frozen=True)
class RouteRule:
    path: str  # the full path format, e.g. /api/v1/collections/{name}/search
    methods: frozenset[str]
    scope: Scope | None
    regex: re.Pattern[str]

    def matches(self, path: str, method: str) -> bool:
        allowed = method in self.methods or (method == "HEAD" and "GET" in self.methods)
        return allowed and self.regex.match(path) is not None


def route_rules(app: FastAPI) -> list[RouteRule]:
    """Every HTTP route of the app, in matching order, with the scope it needs (mounts such as
    /static are public and not listed)."""
    # FastAPI >= 0.16x keeps included routers unflattened; iter_route_contexts flattens them.
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    rules = []
    for entry in flatten(app.routes) if flatten else app.routes:
        original = getattr(entry, "original_route", entry)
        path, methods = getattr(entry, "path", None), getattr(entry, "methods", None)
        if not path or not methods:
            continue
        scope = required_scope(original, path=path, methods=frozenset(methods))
        shown = getattr(entry, "path_format", None) or path
        rules.append(RouteRule(shown, frozenset(methods), scope, compile_path(path)[0]))
    return rules


@dataclass(frozen=True)
class Access:
    """The middleware's decision for one request: whether keys are enforced, and who called."""

    enforced: bool
    principal: Principal | None
    auth_off: bool = False  # CBIR_AUTH=off: nothing is ever checked


def require(request: Request, scope: Scope, *, what: str, even_keyless: bool = False) -> None:
    """Raise unless the caller may do ``what``, which needs ``scope`` (for checks that depend on
    the body, e.g. a server-folder import on the route that also takes archive uploads).

    ``even_keyless``: a key is needed even while ``CBIR_AUTH=auto`` has no keys yet (only
    ``CBIR_AUTH=off`` lifts it): for what reads the server's own files."""
    access: Access | None = request.scope.get(ACCESS)
    if access is None:  # the middleware did not run: fail closed
        raise Forbidden(f"{what} needs an API key with the {scope.name} scope")
    if access.enforced or (even_keyless and not access.auth_off):
        _check(access.principal, scope, what=what, presented=False)  # a bad key got its 401 already


def _check(principal: Principal | None, scope: Scope, *, what: str, presented: bool) -> None:
    if principal is None:
        if presented:
            raise Unauthorized("the API key is not valid (unknown or revoked)")
        raise Unauthorized(
            f"{what} needs an API key with the {scope.name} scope: send it in the {KEY_HEADER} header"
        )
    if principal.scope < scope:
        raise Forbidden(
            f"{what} needs the {scope.name} scope; the key {principal.name!r} has {principal.scope.name}"
        )


class RateLimiter:
    """Token buckets, one per caller: ``burst`` requests at once, refilled at ``per_minute``."""

    MAX_BUCKETS = 10_000

    def __init__(
        self, *, per_minute: int, burst: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst or per_minute)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def hit(self, who: str) -> float:
        """Take a token for ``who``: 0.0 when allowed, else the seconds until one is free."""
        now = self.clock()
        with self._lock:
            tokens, stamp = self._buckets.get(who, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                if len(self._buckets) > self.MAX_BUCKETS:
                    self._prune(now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget callers whose bucket has refilled (they are indistinguishable from new ones); under
        a flood of distinct callers, also the ones first seen longest ago, so memory stays bounded."""
        full = [w for w, (t, s) in self._buckets.items() if t + (now - s) * self.rate >= self.capacity]
        for who in full:
            del self._buckets[who]
        excess = len(self._buckets) - self.MAX_BUCKETS // 2
        for who in list(self._buckets)[: max(0, excess)]:
            del self._buckets[who]


class Guard:
    """Settings, key ring and rate limiter of one app; the key ring arrives with the database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        parse_config_keys(settings.api_keys.get_secret_value())  # a bad CBIR_API_KEYS fails at start
        self.keys: KeyRing | None = None
        per_minute = settings.rate_limit_per_minute
        self.limiter = (
            RateLimiter(per_minute=per_minute, burst=settings.rate_limit_burst) if per_minute else None
        )
        self.refusing_logged = False  # the exposed keyless refusal is logged once per service

    def open_keys(self, db: Database) -> KeyRing:
        self.keys = KeyRing(db, config_keys=self.settings.api_keys.get_secret_value())
        return self.keys

    def enforced(self) -> bool:
        mode = self.settings.auth
        return mode == "on" or (mode == "auto" and self.keys is not None and self.keys.any_keys())

    def decide(
        self, *, needed: Scope, key: str | None, client: str, what: str, exposed: str | None = None
    ) -> Access:
        """Who is calling and whether they may; raises Unauthorized, Forbidden or RateLimited.
        ``exposed`` says why the caller may be another machine (app.api.exposure), if it may."""
        assert self.keys is not None
        principal = self.keys.authenticate(key) if key else None
        if self.limiter is not None:
            # Unknown keys share their address's bucket, so guessing keys is rate limited too.
            who = f"key:{principal.name}" if principal else f"address:{client}"
            wait = self.limiter.hit(who)
            if wait > 0:
                raise RateLimited(
                    f"more than {self.settings.rate_limit_per_minute} requests a minute; retry later",
                    retry_after=max(1, math.ceil(wait)),
                )
        enforced = self.enforced()
        if exposed and not enforced and needed > Scope.read and self.settings.auth == "auto":
            if not self.refusing_logged:
                self.refusing_logged = True
                log_refusing(exposed)
            raise refusal(what, why=exposed)
        if enforced and (key or needed > Scope.read or self.settings.search_requires_key):
            _check(principal, needed, what=what, presented=bool(key))
        return Access(enforced=enforced, principal=principal, auth_off=self.settings.auth == "off")


def presented_key(headers: dict[str, str]) -> str | None:
    key = headers.get("x-api-key")
    if key is None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            key = token
    return key.strip() if key and key.strip() else None


def _key_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers that may carry a key (as ``presented_key`` reads them): the last of each name
    wins, as in a dict of all of them; the other headers are never decoded."""
    found = {}
    for name, value in raw:
        if len(name) in _KEY_HEADER_LENGTHS and (lower := name.lower()) in _KEY_HEADERS:
            found[lower.decode("latin-1")] = value.decode("latin-1")
    return found


_KEY_HEADERS = frozenset({b"x-api-key", b"authorization"})
_KEY_HEADER_LENGTHS = frozenset(len(name) for name in _KEY_HEADERS)


async def _reject(exc: CbirError, scope: AsgiScope, receive: Receive, send: Send) -> None:
    """Answer as the problem handler would (middleware runs outside the exception handlers)."""
    headers = getattr(exc, "headers", None) or ({"Retry-After": "5"} if exc.status == 503 else None)
    if isinstance(exc, RateLimited):
        note_refusal(scope, "rate_limit")
    response = problem(status=exc.status, title=exc.title, detail=exc.detail, code=exc.code, headers=headers)
    await response(scope, receive, send)


T = TypeVar("T")


class PathMemo(Generic[T]):
    """(path, method) -> what a middleware worked out for it (the scan over every route's regex is
    its cost, and a client sends the same path again and again). Bounded: ids make paths many, so
    it starts afresh when full, and a made-up long path is never kept."""

    SEEN_PATHS = 4096
    SEEN_PATH_CHARS = 200

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], T] = {}

    def get(self, path: str, method: str, work: Callable[[], T]) -> T:
        key = (path, method)
        if key in self._seen:
            return self._seen[key]
        found = work()
        if len(path) <= self.SEEN_PATH_CHARS:
            if len(self._seen) >= self.SEEN_PATHS:
                self._seen.clear()
            self._seen[key] = found
        return found


class AccessControl:
    """ASGI middleware: find the route, decide, answer 401/403/429 before the body is read."""

    def __init__(self, app: ASGIApp, *, service: FastAPI, guard: Guard) -> None:
        self.app = app
        self.service = service
        self.guard = guard

        self._rules: list[RouteRule] | None = None
        self._seen: PathMemo[Scope | None] = PathMemo()  # (path, method) -> the scope needed

    def _needed(self, scope: AsgiScope) -> Scope | None:
        path, method = get_route_path(scope), scope["method"]
        return self._seen.get(path, method, lambda: self._work_out(path, method))

    def _work_out(self, path: str, method: str) -> Scope | None:
        if self._rules is None:  # built on the first request, once every route is registered
            self._rules = route_rules(self.service)
        # a mount (static files), a 404 or a 405 needs nothing: nothing runs
        return next((rule.scope for rule in self._rules if rule.matches(path, method)), None)

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = self._needed(scope)
        if needed is None:
            await self.app(scope, receive, send)
            return
        headers = _key_headers(scope["headers"])
        client = scope.get("client")
        what = f"{scope['method']} {scope['path']}"
        try:
            if self.guard.keys is None:
                raise DatabaseUnavailable("the service is starting; retry shortly")
            if self.guard.keys.stale():
                await run_in_threadpool(self.guard.keys.refresh)
            access = self.guard.decide(
                needed=needed,
                key=presented_key(headers),
                client=client[0] if client else "-",
                what=what,
                exposed=exposure(listen_host=self.guard.settings.host, server=scope.get("server")),
            )
        except CbirError as exc:
            await _reject(exc, scope, receive, send)
            return
        except Exception:  # the key ring could not be read at all
            unavailable = DatabaseUnavailable("the API keys could not be read; retry shortly")
            await _reject(unavailable, scope, receive, send)
            return
        scope[ACCESS] = access
        await self.app(scope, receive, send)


def _document(app: FastAPI, settings: Settings) -> None:
    """Add the X-API-Key scheme to the OpenAPI document, and per operation its scope (app.api.openapi
    declares the 401, 403 and 429 problem responses)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME] = {
            "type": "apiKey",
            "in": "header",
            "name": KEY_HEADER,
            "description": "An API key (`cbir keys create NAME --scope read|write|admin`); "
            "`Authorization: Bearer KEY` works too. Scopes: read < write < admin. Reads need one "
            "only when CBIR_SEARCH_REQUIRES_KEY is on.",
        }
        for rule in route_rules(app):
            needed = rule.scope
            for method in rule.methods:
                operation = schema.get("paths", {}).get(rule.path, {}).get(method.lower())
                if operation is None:
                    continue
                operation[MARK] = needed.name if needed else "public"
                if needed is None:
                    operation["security"] = []
                    continue
                optional = needed is Scope.read and not settings.search_requires_key
                operation["security"] = [{SCHEME: []}, {}] if optional else [{SCHEME: []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, settings: Settings) -> Guard:
    """Protect every route of ``app``; the lifespan sets ``guard.keys`` once the database is open."""
    guard = Guard(settings)
    app.add_middleware(AccessControl, service=app, guard=guard)
    _document(app, settings)
    return guard
