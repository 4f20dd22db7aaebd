"""Costly work in a request stops when its client leaves.

The work runs on the thread pool with a cancellation token; meanwhile the request's ASGI receive
channel is watched for ``http.disconnect``. When the client goes (or the server cancels the
request at the end of a graceful shutdown), the token is set and the work stops at its next
check, between batches, instead of computing an answer nobody will read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from app.core.cancel import CancelToken

log = logging.getLogger(__name__)
T = TypeVar("T")
DISCONNECTED = "the client disconnected"


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body, if any, was read before the route ran)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_cancellable(request: Request, work: Callable[..., T], /, **kwargs: Any) -> T:
    """``work(**kwargs, token=token)`` on the thread pool; the token is set when the client leaves."""
    token = CancelToken()
    task = asyncio.ensure_future(run_in_threadpool(functools.partial(work, **kwargs, token=token)))
    # Its outcome is read below, or dropped when the request was cancelled: never "not retrieved".
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            token.cancel(DISCONNECTED)
            log.warning("%s %s stopped: %s", request.method, request.url.path, DISCONNECTED)
        return await task  # raises Cancelled once the work has stopped
    except asyncio.CancelledError:  # the server gave up on the request (shutdown)
        token.cancel("the service is shutting down")
        raise
    finally:
        watcher.cancel()
