"""Decoding within the process's decode memory budget (app/decode_budget.py).

A decode reserves what its header says it will hold (app/decode_cost.py) before any pixel exists,
and keeps the reservation while its pixels live: through the embedder's preprocessing for a search
or an import member, through embedding and storing for an upload (whose decoded images are kept
for a re-embedding under the write lock). A request that finds the budget full waits
CBIR_DECODE_BUDGET_WAIT_S, then gets 503 overloaded; an import waits until there is room or it
stops. Nothing waits for the budget while holding the write lock: a request holding a reservation
may be waiting for that lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from app.context import AppContext
from app.decode_cost import DecodeCost
from app.errors import CbirError
from app.faults import delay_point
from app.imaging import DecodedImage, decode_image, plan_decode


class DecodeStopped(Exception):
    """An import stopped while its decode waited for room in the budget."""


def _reservation(ctx: AppContext, plan: DecodeCost | None) -> int:
    # Where the header does not say, the most any image may hold: the decoder enforces that cap.
    return plan.nbytes if plan is not None else ctx.limits.max_decode_bytes or 0


def estimated_bytes(ctx: AppContext, data: bytes) -> int:
    """What decoding ``data`` reserves; nothing for bytes refused before any pixel is decoded
    (empty, over the pixel or byte caps)."""
    try:
        plan = plan_decode(data, limits=ctx.limits)
    except CbirError:
        return 0
    return _reservation(ctx, plan)


@contextmanager
def reserved_for_request(ctx: AppContext, blobs: Sequence[bytes]) -> Iterator[None]:
    """Hold the decode memory of ``blobs`` decoded and kept together (a batch of uploads);
    503 overloaded when the budget stays full for CBIR_DECODE_BUDGET_WAIT_S."""
    nbytes = sum(estimated_bytes(ctx, data) for data in blobs)
    with ctx.decode_budget.reserve(nbytes, wait_s=ctx.settings.decode_budget_wait_s):
        yield


def acquire_for_import(ctx: AppContext, nbytes: int, *, stopped: Callable[[], bool]) -> int:
    """Wait for room for ``nbytes`` as long as it takes; returns the bytes to release.
    DecodeStopped when ``stopped()`` turns true first."""
    got = ctx.decode_budget.acquire(nbytes, timeout=None, stopped=stopped)
    if got is None:
        raise DecodeStopped("the import stopped while waiting for decode memory")
    return got


@contextmanager
def decoding(
    ctx: AppContext, data: bytes, *, stopped: Callable[[], bool] | None = None, budget: bool = True
) -> Iterator[DecodedImage]:
    """Decode ``data`` holding its reservation for the block (preprocess inside it).

    A request (``stopped`` None) waits CBIR_DECODE_BUDGET_WAIT_S at most (503 overloaded); an
    import passes its stop flag and waits. The caps (413) are checked before anything is reserved.
    ``budget=False`` reserves nothing: for a decode under the write lock, which must not wait.
    """
    limits = ctx.limits
    plan = plan_decode(data, limits=limits)
    nbytes = _reservation(ctx, plan) if budget else 0
    if stopped is None:
        with ctx.decode_budget.reserve(nbytes, wait_s=ctx.settings.decode_budget_wait_s):
            decoded = decode_image(data, limits=limits, plan=plan)
            delay_point("decode")
            yield decoded
        return
    got = acquire_for_import(ctx, nbytes, stopped=stopped)
    try:
        decoded = decode_image(data, limits=limits, plan=plan)
        delay_point("decode")
        yield decoded
    finally:
        ctx.decode_budget.release(got)


class ChunkHold:
    """Room held for a chunk decoded in a worker process, given back once (when its future is
    done, or when it was never submitted)."""

    def __init__(self, ctx: AppContext, nbytes: int) -> None:
        self._budget = ctx.decode_budget
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self.handed = False

    def release(self, _: object = None) -> None:
        with self._lock:
            nbytes, self._nbytes = self._nbytes, 0
        self._budget.release(nbytes)

    def until_done(self, future: Future[Any]) -> None:
        self.handed = True
        future.add_done_callback(self.release)


@contextmanager
def held_for_chunk(
    ctx: AppContext, blobs: Sequence[bytes], *, stopped: Callable[[], bool]
) -> Iterator[ChunkHold]:
    """Room for the largest of ``blobs`` (a worker process decodes one at a time), waited for as
    long as it takes; hand it to the chunk's future with ``until_done``."""
    nbytes = max((estimated_bytes(ctx, data) for data in blobs), default=0)
    hold = ChunkHold(ctx, acquire_for_import(ctx, nbytes, stopped=stopped))
    try:
        yield hold
    finally:
        if not hold.handed:
            hold.release()
