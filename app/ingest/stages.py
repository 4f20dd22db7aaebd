"""The decode and embed stages of the one ingest path, and what an image carries through them.

```
 Item (bytes, name, metadata) -> Staged -> decode_staged -> embed_staged -> write_staged (store.py)
```

A single upload (``ingest_batch`` in app/ingest/store.py) and a bulk import (app/ingest/pipeline.py)
call these same functions; where they run is the runner's choice: the caller's thread, decoding
threads, or worker processes (``decode_and_embed``, on a pool the context's Workers keep).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import torch
from sqlalchemy import select

from app.catalog.collections import checkpoint_of, require_collection
from app.context import AppContext
from app.core.errors import CbirError, EmbedderNotReady
from app.core.settings import Settings
from app.data.records import CollectionRecord, ImageRecord
from app.embedding.embedders import EmbedderCache
from app.imaging.decode import DecodedImage, ImageLimits, decode_image
from models.base import Embedder


@dataclass
class Item:
    """One image to store: raw bytes, a display name and JSON metadata (e.g. {"label": "7"})."""

    name: str | None
    data: bytes
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemResult:
    name: str | None
    status: str  # "added", "duplicate" or "rejected"
    image_id: int | None = None
    code: str | None = None
    detail: str | None = None
    error: CbirError | None = field(default=None, repr=False)


@dataclass
class Staged:
    """One image on its way through the stages."""

    position: int
    item: Item
    sha256: str | None = None
    result: ItemResult | None = None  # decided before the write: rejected
    known: bool = False  # its bytes were already stored when it was read
    format: str | None = None
    width: int = 0
    height: int = 0
    prepared: Any = None
    vector: np.ndarray | None = None
    version: str | None = None  # the embedder version that made ``vector``

    def reject(self, exc: CbirError) -> None:
        self.result = ItemResult(self.item.name, "rejected", code=exc.code, detail=exc.detail, error=exc)


_UNSET: Any = object()


@dataclass
class Target:
    """The collection being written and its served version's embedder, loaded on first use (in
    worker-process mode this process never needs it: the workers embed)."""

    ctx: AppContext
    record: CollectionRecord
    checkpoint: Any
    _embedder: Any = _UNSET

    @property
    def trained(self) -> bool:
        return self.record.embedder_version is not None

    @property
    def embedder(self) -> Embedder | None:
        if self._embedder is _UNSET:
            # Only a result is kept: another error (weights missing, a stale checkpoint) is raised
            # again for every image that asks, never remembered as "no embedder".
            embedder = None
            if self.trained:
                try:
                    embedder = self.ctx.embedders.for_collection(self.record, self.checkpoint)
                except EmbedderNotReady:
                    embedder = None
            self._embedder = embedder
        return self._embedder


class HasEmbedder(Protocol):
    """Whose embedder decodes and embeds (a Target; in a worker process, the worker's own): read
    only once an image needs it, so a batch with nothing to embed loads no model."""

    @property
    def embedder(self) -> Embedder | None: ...


@dataclass
class _Fixed:
    embedder: Embedder | None


def resolve_target(ctx: AppContext, collection: str) -> Target:
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
    return Target(ctx, record, checkpoint)


def mark_known(ctx: AppContext, target: Target, staged: Sequence[Staged]) -> None:
    """Flag the images whose bytes the collection already stores: they skip decode and embed, and
    the write answers them as duplicates."""
    shas = [s.sha256 for s in staged if s.sha256 is not None]
    if not shas:
        return
    with ctx.db.session() as session:
        known = set(
            session.scalars(
                select(ImageRecord.sha256)
                .where(ImageRecord.collection_id == target.record.id)
                .where(ImageRecord.sha256.in_(shas))
            )
        )
    for s in staged:
        if s.sha256 in known:
            s.known = True


# -- decode -----------------------------------------------------------------------------------
# ``opened(data, min_side)``: decoded within the runner's memory reservation, a JPEG no larger
# than ``min_side`` needs (None: whole).
Opener = Callable[[bytes, int | None], AbstractContextManager[DecodedImage]]


def plain_decoder(limits: ImageLimits) -> Opener:
    """Decode without touching the decode memory budget: for a caller that reserved it already (a
    batch of uploads) or has none to share (a worker process)."""

    @contextmanager
    def opened(data: bytes, min_side: int | None = None) -> Iterator[DecodedImage]:
        yield decode_image(data, limits=limits, min_side=min_side)

    return opened


def decode_staged(staged: Staged, target: HasEmbedder, *, opened: Opener) -> None:
    """Decode, validate and (for a trained embedder) preprocess one image; a bad one gets its
    rejected result. ``opened(data, min_side)`` decodes within whatever memory reservation the
    runner holds; a JPEG is decoded no larger than the embedder's ``decode_side`` says it needs."""
    if staged.result is not None or staged.known:
        return
    try:
        embedder = target.embedder
        min_side = getattr(embedder, "decode_side", None) if embedder is not None else None
        with opened(staged.item.data, min_side) as decoded:
            staged.format, staged.width, staged.height = decoded.format, decoded.width, decoded.height
            if embedder is not None:
                staged.prepared = embedder.preprocess(decoded.image)
    except CbirError as exc:
        staged.reject(exc)


# -- embed ------------------------------------------------------------------------------------
# Input bytes of one forward pass: activations scale with it (a pretrained CNN holds 15-20x its
# input at once), so photos go through a few at a time (about 6 at 224x224), small images in full
# batches. Throughput per image barely depends on the batch on a CPU.
FORWARD_INPUT_BYTES = 4 * 1024 * 1024


def _nbytes(prepared: Any) -> int:
    if isinstance(prepared, list | tuple):
        return sum(_nbytes(p) for p in prepared)
    return int(getattr(prepared, "nbytes", 0) or 0)


def forward_batch(prepared: Any, *, limit: int) -> int:
    """Images per forward pass for inputs like ``prepared``: at most ``limit``, about
    FORWARD_INPUT_BYTES of input."""
    size = _nbytes(prepared)
    return max(1, min(limit, FORWARD_INPUT_BYTES // size)) if size else limit


class ForwardSizer:
    """Images per forward pass chosen by measured throughput, within the memory cap: an import's
    first passes try one image per pass and the cap's batch (``TRIAL_IMAGES`` images each), then
    every pass uses the faster. (ONNX Runtime on two CPU cores ran Holidays photos about 7% faster
    one at a time than three at a time; a GPU wants the full batch.)"""

    TRIAL_IMAGES = 24

    def __init__(self) -> None:
        self._images: dict[int, int] = {}
        self._seconds: dict[int, float] = {}
        self._lock = threading.Lock()

    def step(self, cap: int) -> int:
        candidates = sorted({1, cap})
        with self._lock:
            for size in candidates:
                if self._images.get(size, 0) < self.TRIAL_IMAGES:
                    return size
            return max(candidates, key=lambda size: self._images[size] / max(self._seconds[size], 1e-9))

    def record(self, size: int, *, images: int, seconds: float) -> None:
        with self._lock:
            self._images[size] = self._images.get(size, 0) + images
            self._seconds[size] = self._seconds.get(size, 0.0) + seconds


def embed_staged(
    staged: Sequence[Staged],
    target: HasEmbedder,
    *,
    version: str | None,
    limit: int,
    sizer: ForwardSizer | None = None,
    observe: Callable[..., None] | None = None,
) -> None:
    """Embed the preprocessed images: each gets its (d,) float32 unit ``vector`` and ``version``,
    at most ``limit`` images per forward pass (fewer for large inputs, see forward_batch; ``sizer``
    picks between one and that many by measured throughput). ``observe(images=, seconds=)`` is
    called after each pass (``Metrics.embedded``)."""
    ready = [s for s in staged if s.prepared is not None]
    embedder = target.embedder if ready else None
    if embedder is None:
        return
    cap = forward_batch(ready[0].prepared, limit=limit)
    first = 0
    while first < len(ready):
        step = sizer.step(cap) if sizer is not None else cap
        part = ready[first : first + step]
        began = time.perf_counter()
        vectors = embedder.embed_prepared([s.prepared for s in part])
        seconds = time.perf_counter() - began
        if sizer is not None and len(part) == step:
            sizer.record(step, images=len(part), seconds=seconds)
        if observe is not None:
            observe(images=len(part), seconds=seconds)
        for s, vector in zip(part, vectors, strict=True):
            s.vector, s.prepared, s.version = vector, None, version
        first += len(part)


# -- worker processes -------------------------------------------------------------------------
# Decoding a small image is mostly Python (Pillow's plug-in code), so decoding threads hold the
# GIL against the writer; worker processes decode, preprocess and embed a chunk each, and hand
# back only sizes and vectors. Each keeps one embedder, built like the service's.
_WORKER: dict[str, Any] = {}


def worker_init(
    settings_json: str, spec: str, checkpoint: dict[str, Any] | None, version: str | None
) -> None:
    # No app.core.memory.tune_malloc here: with every buffer over 256 KiB mapped and unmapped, the
    # model's activations cost page faults on each forward pass (embedding was 30% slower).
    _exit_with_parent()
    torch.set_num_threads(1)
    settings = Settings.model_validate_json(settings_json)
    embedder = None
    if version is not None:
        cache = EmbedderCache(settings=settings, device=torch.device("cpu"))
        embedder = cache.get(spec, SimpleNamespace(**checkpoint) if checkpoint else None)  # type: ignore[arg-type]
        if embedder.version != version:
            raise RuntimeError(f"worker built {embedder.version}, the collection serves {version}")
    _WORKER.update(
        embedder=embedder, limits=ImageLimits.from_settings(settings), batch=settings.embed_batch_size
    )


def _exit_with_parent() -> None:
    """A worker outlives a parent killed with SIGKILL (its queue never closes): watch the parent
    and leave when it is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="cbir-parent-watch", daemon=True).start()


def _in_worker(blobs: list[bytes]) -> tuple[list[Staged], _Fixed]:
    return [Staged(i, Item(None, data)) for i, data in enumerate(blobs)], _Fixed(_WORKER["embedder"])


def decode_and_embed(blobs: list[bytes]) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """In a worker: per blob ("ok", format, width, height, vector or None) or ("rejected", code,
    detail); and per forward pass its images and seconds, for the parent's metrics."""
    staged, embedder = _in_worker(blobs)
    for s in staged:
        decode_staged(s, embedder, opened=plain_decoder(_WORKER["limits"]))
    passes: list[dict[str, Any]] = []
    embed_staged(staged, embedder, version=None, limit=_WORKER["batch"], observe=lambda **p: passes.append(p))
    outcomes = [
        ("rejected", s.result.code, s.result.detail)
        if s.result is not None
        else ("ok", s.format, s.width, s.height, s.vector)
        for s in staged
    ]
    return outcomes, passes


def time_stages(blobs: list[bytes]) -> tuple[float, float]:
    """In a worker, for ``cbir bench import``: seconds spent decoding (with validation and
    preprocessing) the blobs, then embedding them, each stage alone."""
    staged, embedder = _in_worker(blobs)
    began = time.perf_counter()
    for s in staged:
        decode_staged(s, embedder, opened=plain_decoder(_WORKER["limits"]))
    decode_s = time.perf_counter() - began
    began = time.perf_counter()
    embed_staged(staged, embedder, version=None, limit=_WORKER["batch"])
    return decode_s, time.perf_counter() - began


def worker_pool(ctx: AppContext, target: Target, workers: int) -> ProcessPoolExecutor:
    """The context's warm worker processes for this embedder version (started once, kept for
    later jobs; one set at a time)."""
    record, checkpoint = target.record, target.checkpoint
    fields = None
    if checkpoint is not None:
        fields = {k: getattr(checkpoint, k) for k in ("id", "path", "sha256", "config", "version")}

    def start() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded server
            initializer=worker_init,
            initargs=(ctx.settings.model_dump_json(), record.embedder, fields, record.embedder_version),
        )

    key = (str(ctx.settings.data_dir), record.embedder, record.embedder_version, workers)
    return ctx.workers.process_pool(key, start)
