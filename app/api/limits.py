"""Limits on request bodies, enforced before anything parses them.

Pure ASGI on purpose: a ``BaseHTTPMiddleware`` runs the app in another task, so an error raised
while the route reads the body comes back as a 500. Here a body over its cap, or one that arrives
too slowly, is answered by the middleware itself (413 or 408, problem+json, ``Connection: close``)
and the app sees the client disconnect: its form parser stops, closes its spooled files and its
own answer is dropped.
"""

from __future__ import annotations

import codecs
import re
import time
from typing import TypedDict

import anyio
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import problem
from app.core.errors import BadMultipart, BodyTimeout, CbirError, PayloadTooLarge
from app.core.settings import Settings


class FormLimits(TypedDict, total=False):
    """What ``FastAPI(form_limits=...)`` takes."""

    max_files: int
    max_fields: int
    max_part_size: int


# Boundaries, part headers and the optional metadata field (at most 64 KiB of JSON) around an
# upload of max_upload_bytes.
MULTIPART_OVERHEAD = 128 * 1024
# After body_timeout_s a body must keep arriving at this average rate (64 KiB/s): big archives on
# slow links pass, a client dripping bytes to hold a connection open does not.
MIN_BODY_RATE = 64 * 1024
# Form limits for the routes FastAPI parses (upload, search, compare): they take one file and at
# most one field; a non-file field (the metadata) may hold 1 MiB.
FORM_LIMITS: FormLimits = {"max_files": 4, "max_fields": 16, "max_part_size": 1024 * 1024}
# The batch search (app/api/routes_images.py) takes up to 100 files: the parser counts more, so
# that 101 queries get the route's 422 rather than the parser's 400; the body cap bounds the rest.
BATCH_FORM_LIMITS: FormLimits = {"max_files": 1000, "max_fields": 1000, "max_part_size": 1024 * 1024}
# The search by examples (app/search/examples.py) takes up to 16 files and ids: the parser counts
# more, so that 17 examples get the route's 422 rather than the parser's 400.
EXAMPLE_FORM_LIMITS: FormLimits = {"max_files": 64, "max_fields": 64, "max_part_size": 1024 * 1024}
# A batch search's whole body: this many times CBIR_MAX_UPLOAD_BYTES (each file is held to that).
BATCH_UPLOADS = 5
MAX_CONTENT_TYPE = 512

_ARCHIVE_ROUTE = re.compile(r"/api/v1/collections/[^/]+/imports/?")
_BATCH_ROUTE = re.compile(r"/api/v1/collections/[^/]+/search/batch/?")
# RFC 2046 section 5.1.1: 1 to 70 characters from bchars, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_DISCONNECT: Message = {"type": "http.disconnect"}


def body_cap(settings: Settings, path: str, *, multipart: bool = True) -> int:
    """The most bytes a request body to ``path`` may have: the archive cap only for an archive
    upload (multipart to the imports route; a JSON body is parsed in memory), ``BATCH_UPLOADS``
    uploads' worth for a batch search."""
    if multipart and _ARCHIVE_ROUTE.fullmatch(path):
        return settings.max_archive_bytes + MULTIPART_OVERHEAD
    if _BATCH_ROUTE.fullmatch(path):
        return BATCH_UPLOADS * settings.max_upload_bytes + MULTIPART_OVERHEAD
    return settings.max_upload_bytes + MULTIPART_OVERHEAD


def multipart_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type (None for any other type); raises
    ``BadMultipart`` for one that cannot be parsed safely.

    Checked without a general header parser: long or odd parameters (ReDoS-shaped boundaries,
    thousands of parameters) are refused in time linear in the header's length.
    """
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        return None
    if len(content_type) > MAX_CONTENT_TYPE:
        raise BadMultipart(f"the Content-Type header is longer than {MAX_CONTENT_TYPE} characters")
    boundaries = []
    for param in params.split(";"):
        key, eq, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and eq:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            boundaries.append(value)
    if len(boundaries) != 1:
        raise BadMultipart("the Content-Type needs exactly one multipart boundary parameter")
    if not _BOUNDARY.fullmatch(boundaries[0]):
        raise BadMultipart(
            "the multipart boundary must be 1-70 characters of RFC 2046 (letters, digits, '()+_,-./:=? )"
        )
    _check_charset(content_type)
    return boundaries[0].encode("ascii")


def _check_charset(content_type: str) -> None:
    """BadMultipart for a declared charset Python does not know: Starlette would read every part
    as Latin-1 (app/api/forms.py reads the parts in the declared charset, UTF-8 by default)."""
    declared = parse_options_header(content_type)[1].get(b"charset")  # as the form parser reads it
    if declared is None:
        return
    charset = declared.decode("latin-1")
    try:
        codecs.lookup(charset)
    except LookupError:
        raise BadMultipart(f"the multipart body declares an unknown charset {charset[:40]!r}") from None


async def _answer(scope: Scope, receive: Receive, send: Send, error: CbirError) -> None:
    response = problem(
        status=error.status,
        title=error.title,
        detail=error.detail,
        code=error.code,
        headers={"Connection": "close"},  # the rest of the body is never read
    )
    await response(scope, receive, send)


class BodyLimitMiddleware:
    """Caps every request body (Content-Length and counted bytes) and the time it takes to arrive."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            boundary = multipart_boundary(headers.get("content-type", ""))
        except BadMultipart as error:
            await _answer(scope, receive, send, error)
            return
        cap = body_cap(self.settings, get_route_path(scope), multipart=boundary is not None)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            await _answer(scope, receive, send, PayloadTooLarge(_too_large(cap)))
            return
        guard = _BodyGuard(
            scope, receive, send, cap=cap, timeout=self.settings.body_timeout_s, boundary=boundary
        )
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.answered:
                raise
            # The app failed because we cut its body off; the client already has our answer.


def _too_large(cap: int) -> str:
    return (
        f"the request body is larger than its {cap}-byte limit "
        "(CBIR_MAX_UPLOAD_BYTES, or CBIR_MAX_ARCHIVE_BYTES for imports, plus multipart overhead)"
    )


class _BodyGuard:
    """One request's ``receive`` and ``send``: counts body bytes and enforces the deadline; a
    multipart body must contain its close delimiter (Starlette accepts a body that stops inside a
    file part as a form without that file, and leaves the part's spooled file open)."""

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, *, cap: int, timeout: float, boundary: bytes | None
    ) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.cap = cap
        self.timeout = timeout
        self.started_at = time.monotonic()
        self.received = 0
        self.body_done = False
        self.response_started = False
        self.answered = False
        self.close_delimiter = b"--" + boundary + b"--" if boundary is not None else None
        self.tail = b""  # the last bytes seen, to find a delimiter split between two messages

    async def receive(self) -> Message:
        if self.answered:
            return _DISCONNECT
        if self.body_done or self.response_started:
            return await self._receive()
        allowed = self.timeout + self.received / MIN_BODY_RATE - (time.monotonic() - self.started_at)
        message: Message | None = None
        with anyio.move_on_after(max(allowed, 0.0)):
            message = await self._receive()
        if message is None:
            await self._answer_instead(
                BodyTimeout(
                    f"the request body did not arrive in time: {self.received} bytes in "
                    f"{time.monotonic() - self.started_at:.1f} s (CBIR_BODY_TIMEOUT_S={self.timeout:g})"
                )
            )
            return _DISCONNECT
        if message["type"] == "http.request":
            body = message.get("body", b"")
            self.received += len(body)
            if self.received > self.cap:
                await self._answer_instead(PayloadTooLarge(_too_large(self.cap)))
                return _DISCONNECT
            self.body_done = not message.get("more_body", False)
            if self.close_delimiter is not None and not self._closed(body) and self.body_done:
                await self._answer_instead(
                    BadMultipart("the multipart body ends before its closing boundary")
                )
                return _DISCONNECT
        return message

    def _closed(self, body: bytes) -> bool:
        """Whether the close delimiter has now been seen (then it is not looked for again)."""
        assert self.close_delimiter is not None
        keep = len(self.close_delimiter) - 1
        if self.close_delimiter in self.tail + body[:keep] or self.close_delimiter in body:
            self.close_delimiter = None
            return True
        self.tail = (self.tail + body[-keep:])[-keep:]
        return False

    async def send(self, message: Message) -> None:
        if self.answered:
            return  # the app's reply to a body it never got in full
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _answer_instead(self, error: CbirError) -> None:
        self.answered = True
        if not self.response_started:
            await _answer(self.scope, self._receive, self._send, error)
