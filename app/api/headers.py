"""Security headers on every response, and CORS only for the origins the settings name."""

from __future__ import annotations

import re

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.settings import Settings, check_cors

# The pages load their scripts and styles from /static only (no inline code, no handlers in
# attributes); images come from the API or, for a query being shown, a blob: URL.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's /docs and /redoc pages are an inline script over Swagger UI / ReDoc from jsDelivr.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com; "
    "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
# Stored originals and thumbnails. A file may be a valid image and an HTML page at once (a
# polyglot); should a browser ever render one as a document, it runs no script, loads nothing and
# lives in a unique origin. <img> elements of our pages are not affected by it.
IMAGE_CSP = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CORS_METHODS = ["GET", "POST", "PUT", "DELETE"]
CORS_HEADERS = ["Content-Type", "X-API-Key", "Authorization"]
CORS_EXPOSED = ["X-Total-Count", "Retry-After", "Location"]


class SecurityHeadersMiddleware:
    """nosniff, no referrer and no framing on every response; a Content-Security-Policy on HTML."""

    def __init__(self, app: ASGIApp, *, docs_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = DOCS_CSP if get_route_path(scope) in self.docs_paths else PAGE_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON.items():
                    headers.setdefault(name, value)
                if headers.get("content-type", "").startswith("text/html"):
                    headers.setdefault("Content-Security-Policy", csp)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI, settings: Settings) -> None:
    """Add CORS (only when origins are configured) inside the security headers."""
    check_cors(settings.cors_origins, allow_credentials=settings.cors_allow_credentials)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_HEADERS,
            expose_headers=CORS_EXPOSED,
            max_age=600,
        )
    docs = {app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=frozenset(p for p in docs if p))


def download_name(original: str | None, *, image_id: int, extension: str) -> str:
    """A file name for Content-Disposition: the uploaded name's stem in safe ASCII with the stored
    format's extension (never the name's own: a download is never saved as .html), else
    ``image-ID.EXT``."""
    stem = re.split(r"[/\\]", original or "")[-1].rsplit(".", 1)[0]
    stem = _UNSAFE_NAME_CHARS.sub("_", stem).strip("._-")[:100]
    if not any(c.isalnum() for c in stem):
        stem = f"image-{image_id}"
    return f"{stem}.{extension}"
