"""Decoding within the process's decode memory budget (app/imaging/decode_budget.py).

A decode reserves what its header says it will hold (app/imaging/decode_cost.py) before any pixel
exists, and keeps the reservation while its pixels live: through the embedder's preprocessing for a
search or an import member, through embedding and storing for an upload (which keeps its
reservation until it is stored, so a re-embedding under the write lock decodes again within it).
A request that finds the budget full waits
CBIR_DECODE_BUDGET_WAIT_S, then gets 503 overloaded; an import waits until there is room or it
stops. Nothing waits for the budget while holding the write lock: a request holding a reservation
may be waiting for that lock.

CBIR_MAX_DECODE_BYTES guards new input (uploads, searches, imports). A file the store already holds
(re-embedding, training, evaluation, thumbnails, compare) was accepted under the settings of its
day and stays decodable under a smaller cap (a smaller host, a smaller budget): it goes through
``decoding_stored``, which never refuses it for its bytes. A JPEG is still decoded at the reduced
scale the cap asks for (as a search with the same bytes is; 1/8 where none fits); anything else is
decoded whole, holding its estimate, or the whole budget when the estimate is larger: such a file
waits until it has the budget to itself (a request for it, 503 overloaded after
CBIR_DECODE_BUDGET_WAIT_S).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

from app.core.errors import CbirError, ImageTooLarge
from app.core.faults import delay_point
from app.core.settings import Settings
from app.imaging.decode import DecodedImage, ImageLimits, decode_image, plan_decode
from app.imaging.decode_budget import DecodeBudget
from app.imaging.decode_cost import DecodeCost, jpeg_draft_scale, peak_bytes


class DecodeContext(Protocol):
    """What decoding needs of the service (the application context has it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def limits(self) -> ImageLimits: ...

    @property
    def decode_budget(self) -> DecodeBudget: ...


class DecodeStopped(Exception):
    """An import or a job stopped while its decode waited for room in the budget."""


def _reservation(ctx: DecodeContext, plan: DecodeCost | None) -> int:
    # Where the header does not say, the most any image may hold: the decoder enforces that cap.
    return plan.nbytes if plan is not None else ctx.limits.max_decode_bytes or 0


def estimated_bytes(ctx: DecodeContext, data: bytes) -> int:
    """What decoding ``data`` reserves; nothing for bytes refused before any pixel is decoded
    (empty, over the pixel or byte caps)."""
    try:
        plan = plan_decode(data, limits=ctx.limits)
    except CbirError:
        return 0
    return _reservation(ctx, plan)


@contextmanager
def reserved_for_request(ctx: DecodeContext, blobs: Sequence[bytes]) -> Iterator[None]:
    """Hold the decode memory of ``blobs`` decoded and kept together (a batch of uploads);
    503 overloaded when the budget stays full for CBIR_DECODE_BUDGET_WAIT_S."""
    nbytes = sum(estimated_bytes(ctx, data) for data in blobs)
    with ctx.decode_budget.reserve(nbytes, wait_s=ctx.settings.decode_budget_wait_s):
        yield


def acquire_for_import(ctx: DecodeContext, nbytes: int, *, stopped: Callable[[], bool]) -> int:
    """Wait for room for ``nbytes`` as long as it takes; returns the bytes to release.
    DecodeStopped when ``stopped()`` turns true first."""
    got = ctx.decode_budget.acquire(nbytes, timeout=None, stopped=stopped)
    if got is None:
        raise DecodeStopped("the work stopped while waiting for decode memory")
    return got


def never_stopped() -> bool:
    """The stop flag of work that waits for the budget as long as it takes (training, evaluation)."""
    return False


def stored_limits(ctx: DecodeContext) -> ImageLimits:
    """The caps for a file the store holds: the pixel caps, and CBIR_MAX_DECODE_BYTES only as the
    choice of a JPEG's reduced scale, never as a refusal."""
    return replace(ctx.limits, refuse_over_decode_bytes=False)


@contextmanager
def decoding(
    ctx: DecodeContext,
    data: bytes,
    *,
    stopped: Callable[[], bool] | None = None,
    budget: bool = True,
    min_side: int | None = None,
) -> Iterator[DecodedImage]:
    """Decode new input ``data`` holding its reservation for the block (preprocess inside it).

    A request (``stopped`` None) waits CBIR_DECODE_BUDGET_WAIT_S at most (503 overloaded); an
    import passes its stop flag and waits. The caps (413) are checked before anything is reserved.
    ``budget=False`` reserves nothing: for a decode under the write lock, which must not wait.
    ``min_side``: as ``decode_image`` (a JPEG decoded no larger than the embedder needs).
    """
    with _decoding(
        ctx, data, limits=ctx.limits, stopped=stopped, budget=budget, min_side=min_side
    ) as decoded:
        yield decoded


@contextmanager
def decoding_stored(
    ctx: DecodeContext, data: bytes, *, stopped: Callable[[], bool] | None = None, budget: bool = True
) -> Iterator[DecodedImage]:
    """Decode a stored file as ``decoding`` does, never refused by CBIR_MAX_DECODE_BYTES (see the
    module docstring). A request (``stopped`` None) still waits CBIR_DECODE_BUDGET_WAIT_S at most;
    a job passes its stop flag (or ``never_stopped``) and waits its turn."""
    with _decoding(ctx, data, limits=stored_limits(ctx), stopped=stopped, budget=budget) as decoded:
        yield decoded


@contextmanager
def _decoding(
    ctx: DecodeContext,
    data: bytes,
    *,
    limits: ImageLimits,
    stopped: Callable[[], bool] | None,
    budget: bool,
    min_side: int | None = None,
) -> Iterator[DecodedImage]:
    plan = plan_decode(data, limits=limits)
    nbytes = _reservation(ctx, plan) if budget else 0
    if stopped is None:
        with ctx.decode_budget.reserve(nbytes, wait_s=ctx.settings.decode_budget_wait_s):
            decoded = decode_image(data, limits=limits, plan=plan, min_side=min_side)
            delay_point("decode")
            yield decoded
        return
    got = acquire_for_import(ctx, nbytes, stopped=stopped)
    try:
        decoded = decode_image(data, limits=limits, plan=plan, min_side=min_side)
        delay_point("decode")
        yield decoded
    finally:
        ctx.decode_budget.release(got)


@contextmanager
def reserved_for_thumbnail(ctx: DecodeContext, data: bytes, *, side: int) -> Iterator[None]:
    """Hold the decode memory of a stored file's thumbnail (a JPEG is drafted to about ``side``
    pixels, anything else decoded whole) for a request: 503 overloaded when the budget stays full
    for CBIR_DECODE_BUDGET_WAIT_S. Never refused by the byte cap, as ``decoding_stored``."""
    try:
        plan = plan_decode(data, limits=stored_limits(ctx))
    except ImageTooLarge:
        plan = None  # over pixel caps lowered since it was stored: count it as the largest image
    if plan is None:
        nbytes = ctx.decode_budget.capacity
    else:
        scale = (
            jpeg_draft_scale(width=plan.width, height=plan.height, side=side) if plan.format == "JPEG" else 1
        )
        nbytes = peak_bytes(
            image_format=plan.format, mode=plan.mode, width=plan.width, height=plan.height, scale=scale
        )
    with ctx.decode_budget.reserve(nbytes, wait_s=ctx.settings.decode_budget_wait_s):
        yield


class ChunkHold:
    """Room held for a chunk decoded in a worker process, given back once (when its future is
    done, or when it was never submitted)."""

    def __init__(self, ctx: DecodeContext, nbytes: int) -> None:
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
    ctx: DecodeContext, blobs: Sequence[bytes], *, stopped: Callable[[], bool]
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
