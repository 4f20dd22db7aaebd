"""Cost budgets: the seconds a costly request would work, estimated before any of it is done.

An estimate is images to embed x seconds per image, plus terms for reading stored vectors,
ranking and fitting. Seconds per image = decoding (from the stored images' mean pixel count) +
the embedder's forward pass, measured once per embedder version and device on a few blank images
and kept by the service (``ctx.costs``, app/embedding/cost_cache.py); until measured, a conservative
built-in figure stands in, and a request that figure would refuse is measured first, so nothing
is refused on a guess.

Within CBIR_SYNC_COST_BUDGET_S work is done in the request; over it the caller refuses (compare,
map: 422 over_budget, naming what fits) or starts a job (evaluate, whitening), which must fit
CBIR_JOB_COST_BUDGET_S.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image
from sqlalchemy import func, select

from app.core.errors import OverBudget
from app.data.db import Database
from app.data.records import ImageRecord
from app.embedding.cost_cache import CostCache
from models import registry
from models.base import Embedder

# Built-in seconds per image of a forward pass, on one slow CPU core (measured on such a core:
# efficientnet_lite0 70-100 ms, pixels 0.02 ms); a measurement replaces them.
BUILTIN_PIXELS_S = 0.001  # pixels, tiny: a resize
BUILTIN_TRAINED_S = 0.01  # cdae, lenet5, cnn_head: small networks on small inputs
BUILTIN_PRETRAINED_S = 0.25  # ImageNet CNNs on 224-pixel inputs
DECODE_S_PER_PIXEL = 3e-8  # 30 ms per megapixel: PNG, the slow case
ROW_READ_S = 2e-5  # one stored vector read from the database
ROW_WRITE_S = 2e-4  # one vector stored with its row and added to the index
PAIR_S = 7e-8  # one (query, image) pair scored and ranked: P@10, mAP, the precision-recall curve
FLOP_S = 1e-10  # one multiply-add (exact search, PCA, whitening fits): float64 BLAS on one core
UMAP_S = 3e-3  # one point of a UMAP layout
PROBE_IMAGES = 8
BATCH_S = 0.5  # a batch of work between two cancellation checks lasts about this long


class CostContext(Protocol):
    """What the estimates need of the service (the application context has it)."""

    @property
    def db(self) -> Database: ...

    @property
    def costs(self) -> CostCache: ...


SYNC = "CBIR_SYNC_COST_BUDGET_S"
JOB = "CBIR_JOB_COST_BUDGET_S"


@dataclass(frozen=True)
class PerImage:
    seconds: float  # decode + forward pass of one stored image
    measured: bool  # False: the embedder's part is the built-in figure


@dataclass(frozen=True)
class Estimate:
    seconds: float
    measured: bool  # every embedder in it was measured on this server
    detail: str  # the main terms, for the problem's detail

    def __add__(self, other: Estimate) -> Estimate:
        detail = "; ".join(d for d in (self.detail, other.detail) if d)
        return Estimate(self.seconds + other.seconds, self.measured and other.measured, detail)


NOTHING = Estimate(0.0, True, "")


def forward_seconds(ctx: CostContext, *, embedder: Embedder, measure: bool) -> tuple[float, bool]:
    """The embedder's seconds per image (forward pass and preprocessing), and whether measured."""
    key = (embedder.version, str(embedder.device))
    known = ctx.costs.speed(key)
    if known is not None:
        return known, True
    if not measure:
        return _builtin(embedder), False
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    embedder.embed_prepared([embedder.preprocess(blank)])  # first call: lazy set-up, not counted
    started = time.perf_counter()
    embedder.embed_prepared([embedder.preprocess(blank) for _ in range(PROBE_IMAGES)])
    seconds = max((time.perf_counter() - started) / PROBE_IMAGES, 1e-6)
    ctx.costs.set_speed(key, seconds)
    return seconds, True


def _builtin(embedder: Embedder) -> float:
    try:
        spec = registry.get_spec(getattr(embedder, "name", "") or "")
    except Exception:  # not a registered name (a wrapped or whitened embedder): assume a CNN
        return BUILTIN_PRETRAINED_S
    if spec.pretrained:
        return BUILTIN_PRETRAINED_S
    return BUILTIN_TRAINED_S if spec.trainable else BUILTIN_PIXELS_S


def mean_pixels(ctx: CostContext, collection_id: int) -> float:
    """The mean pixel count of a collection's stored images (0 when empty)."""
    known = ctx.costs.pixels(collection_id)
    if known is not None:
        return known
    with ctx.db.session() as session:
        value = session.scalar(
            select(func.avg(ImageRecord.width * ImageRecord.height)).where(
                ImageRecord.collection_id == collection_id
            )
        )
    ctx.costs.set_pixels(collection_id, float(value or 0.0))
    return float(value or 0.0)


def per_image(ctx: CostContext, *, embedder: Embedder, collection_id: int, measure: bool) -> PerImage:
    """Seconds to decode and embed one stored image of the collection."""
    forward, measured = forward_seconds(ctx, embedder=embedder, measure=measure)
    return PerImage(mean_pixels(ctx, collection_id) * DECODE_S_PER_PIXEL + forward, measured)


def embedding(
    ctx: CostContext, *, embedder: Embedder, collection_id: int, images: int, measure: bool
) -> Estimate:
    """Decoding and embedding ``images`` stored images of the collection."""
    if images <= 0:
        return NOTHING
    each = per_image(ctx, embedder=embedder, collection_id=collection_id, measure=measure)
    name = getattr(embedder, "version", "?")
    how = "measured" if each.measured else "built-in estimate"
    return Estimate(
        images * each.seconds,
        each.measured,
        f"{images:,} images with {name} at {each.seconds:.4f} s each ({how})",
    )


def plain(seconds: float, detail: str = "") -> Estimate:
    """A term that involves no embedder (reading, ranking, fitting)."""
    return Estimate(max(0.0, seconds), True, detail)


def estimate(build: Callable[[bool], Estimate], *, budget: float) -> Estimate:
    """``build(measure)``: first with built-in speeds; when that is over ``budget`` and a speed
    was not measured yet, measure it and estimate again."""
    first = build(False)
    if first.seconds <= budget or first.measured:
        return first
    return build(True)


def over(
    what: str,
    estimate_: Estimate,
    *,
    budget: float,
    setting: str,
    cheaper: str,
    fits_sample: int | None = None,
) -> OverBudget:
    """The 422 ``over_budget``; its problem also carries ``estimate_s``, ``budget_s`` and, for work
    over a sample (compare, map), ``fits_sample``: the largest sample within the budget (0: none),
    for a client to ask again with."""
    where = "an answer now" if setting == SYNC else "a job"
    extra: dict[str, object] = {"estimate_s": float(f"{estimate_.seconds:.3g}"), "budget_s": budget}
    if fits_sample is not None:
        extra["fits_sample"] = fits_sample
    return OverBudget(
        f"{what} is estimated at {seconds(estimate_.seconds)} s of work ({estimate_.detail}), over "
        f"the {budget:g} s budget for {where} ({setting}); {cheaper}",
        **extra,
    )


def seconds(value: float) -> str:
    """1,234 / 12.3 / 0.0123: three significant digits below 1,000."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def batch_size(per_image_s: float, *, largest: int) -> int:
    """Images per batch so that a batch takes about BATCH_S: the work checks its cancellation
    token between batches, so it stops within about that long."""
    return max(1, min(largest, int(BATCH_S / max(per_image_s, 1e-9))))


def largest_fitting(budget: float, *, fixed: float, each: float) -> int:
    """The most items of ``each`` seconds that fit ``budget`` beside ``fixed`` seconds."""
    return max(0, int((budget - fixed) / each)) if each > 0 else 0
