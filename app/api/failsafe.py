"""The last net under the routes: an unexpected error is a 500 problem on a connection that
stays usable.

Starlette's outermost ``ServerErrorMiddleware`` sends its handler's 500 and then raises the error
again, for the server to log; uvicorn answers an error raised after a response started by closing
the connection. A keep-alive client that sent its next request before it saw the close got a
reset (ECONNRESET) instead of an answer. Here the error is logged with its traceback, answered
with the same problem body, and not raised: the connection stays open for the next request.

An error raised after the response started (a stream cut short) cannot be answered any more: it
goes on up, and the server closes the connection, the only way left to say the body is broken.
Pure ASGI, like app/api/limits.py: no second task, nothing buffered.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import unexpected_problem


class UnexpectedErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            response = unexpected_problem(Request(scope), exc)
            await response(scope, receive, send)
