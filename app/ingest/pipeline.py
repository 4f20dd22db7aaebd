"""The bulk-import pipeline: read -> decode -> embed -> write, each stage on its own thread.

```
 reader thread        decode pool           embed thread        writer (caller's thread)
 bytes, SHA-256,  ->  decode, validate, ->  one forward pass ->  files, rows, vectors and the
 known-duplicate      preprocess            per chunk            job's high-water mark in one
 check per chunk      (GIL released)                             transaction; then the index
```

Chunks of consecutive members travel through bounded queues, so at most a few chunks are in
memory whatever the size of the source. Order is kept end to end: the writer commits members in
source order, and a job's cursor after a commit says exactly which members are done. Members
already stored (same SHA-256 in the collection) skip decoding and embedding. Each stage can also
run alone on prepared input (``cbir bench import`` measures them side by side).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from app.catalog.collections import checkpoint_of, require_collection
from app.context import AppContext
from app.core.errors import CbirError, EmbedderNotReady
from app.core.settings import Settings
from app.data.records import CollectionRecord, ImageRecord
from app.data.storage import sha256_hex
from app.imaging.decode import ImageLimits, decode_image
from app.imaging.decoding import decoding, held_for_chunk
from app.imaging.image_end import strip_trailing
from app.ingest.screening import screened
from app.ingest.sources.kinds import Member
from app.ingest.store import WRITE_LOCK, Accepted, Item, ItemResult, store_accepted
from models import registry
from models.base import Embedder

CHUNK_ITEMS = 256
CHUNK_BYTES = 16 * 1024 * 1024
COMMIT_BYTES = 64 * 1024 * 1024
_PUT_WAIT_S = 0.2


@dataclass
class Staged:
    """One member on its way through the stages."""

    position: int
    item: Item
    sha256: str | None = None
    result: ItemResult | None = None  # decided before the writer: rejected
    known: bool = False  # its bytes were already stored when it was read
    format: str | None = None
    width: int = 0
    height: int = 0
    prepared: Any = None
    vector: np.ndarray | None = None
    version: str | None = None  # the embedder version that made ``vector``


@dataclass
class Chunk:
    items: list[Staged]
    end: int  # the position after its last member
    nbytes: int
    decoding: list[Future[Any]] = field(default_factory=list)
    todo: list[Staged] = field(default_factory=list)  # sent to a worker process
    target: Target | None = None  # whose embedder decodes and embeds it (set by ``decode``)


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
            self._embedder = None
            if self.trained:
                try:
                    self._embedder = self.ctx.embedders.for_collection(self.record, self.checkpoint)
                except EmbedderNotReady:
                    self._embedder = None
        return self._embedder


def resolve_target(ctx: AppContext, collection: str) -> Target:
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
    return Target(ctx, record, checkpoint)


def use_processes(ctx: AppContext, target: Target | None = None) -> bool:
    """Decode and embed in worker processes: on the CPU with two cores or more, for embedders whose
    per-image work is mostly Python (small images, small models), unless CBIR_IMPORT_PROCESSES=0.

    A GPU embeds in this process, fed by decoding threads; so do pretrained CNNs on the CPU: their
    forward passes and JPEG decoding run outside the GIL, so threads keep the cores as busy, while a
    worker process would hold a second torch runtime (about 500 MB). A 1 GB archive of photos
    peaked at 1.2 GB in one process, against 2.8 GB with a worker (README, "Import throughput and
    memory")."""
    if not (ctx.settings.import_processes and ctx.device.type == "cpu" and (os.cpu_count() or 1) >= 2):
        return False
    return target is None or not _pretrained(target.record.embedder)


def _pretrained(embedder: str) -> bool:
    try:
        return registry.parse(embedder)[0].pretrained
    except (KeyError, ValueError):  # an unknown or odd spec: the pipeline's default
        return False


# Input bytes of one forward pass during an import: activations scale with it (a pretrained CNN
# holds 15-20x its input at once), so photos go through a few at a time (about 6 at 224x224), small
# images in full batches. Throughput per image barely depends on the batch on a CPU.
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


def default_workers(ctx: AppContext, *, processes: bool) -> int:
    if ctx.settings.import_workers:
        return ctx.settings.import_workers
    cores = os.cpu_count() or 1
    # Processes leave one core to this process (reading, writing); threads share the GIL anyway.
    return max(1, cores - 1) if processes else min(4, cores)


# -- worker processes -------------------------------------------------------------------------
# Decoding a small image is mostly Python (Pillow's plug-in code), so decoding threads hold the
# GIL against the writer; worker processes decode, preprocess and embed a chunk each, and hand
# back only sizes and vectors. Each keeps one embedder, built like the service's.
_WORKER: dict[str, Any] = {}


def _worker_init(
    settings_json: str, spec: str, checkpoint: dict[str, Any] | None, version: str | None
) -> None:
    from app.embedding.embedders import EmbedderCache

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
    _WORKER.update(embedder=embedder, limits=ImageLimits.from_settings(settings))


def _exit_with_parent() -> None:
    """A worker outlives a parent killed with SIGKILL (its queue never closes): watch the parent
    and leave when it is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="cbir-parent-watch", daemon=True).start()


def time_stages(blobs: list[bytes]) -> tuple[float, float]:
    """``cbir bench import``: seconds this worker spends decoding (with validation and
    preprocessing) the blobs, then embedding them, each stage alone."""
    embedder: Embedder | None = _WORKER["embedder"]
    began = time.perf_counter()
    prepared = []
    for data in blobs:
        try:
            decoded = decode_image(data, limits=_WORKER["limits"])
        except CbirError:
            continue
        if embedder is not None:
            prepared.append(embedder.preprocess(decoded.image))
    decode_s = time.perf_counter() - began
    began = time.perf_counter()
    if embedder is not None and prepared:
        for k in range(0, len(prepared), 256):
            embedder.embed_prepared(prepared[k : k + 256])
    return decode_s, time.perf_counter() - began


def _decode_and_embed(blobs: list[bytes]) -> list[tuple[Any, ...]]:
    """Per blob: ("ok", format, width, height, vector or None) or ("rejected", code, detail)."""
    embedder: Embedder | None = _WORKER["embedder"]
    out: list[tuple[Any, ...]] = []
    prepared: list[Any] = []
    rows: list[int] = []
    for i, data in enumerate(blobs):
        try:
            decoded = decode_image(data, limits=_WORKER["limits"])
        except CbirError as exc:
            out.append(("rejected", exc.code, exc.detail))
            continue
        out.append(("ok", decoded.format, decoded.width, decoded.height, None))
        if embedder is not None:
            prepared.append(embedder.preprocess(decoded.image))
            rows.append(i)
    if prepared:
        assert embedder is not None
        step = 256
        vectors = np.concatenate(
            [embedder.embed_prepared(prepared[k : k + step]) for k in range(0, len(prepared), step)]
        )
        for row, vector in zip(rows, vectors, strict=True):
            out[row] = (*out[row][:4], vector)
    return out


_POOLS: dict[tuple[Any, ...], ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def worker_pool(ctx: AppContext, target: Target, workers: int) -> ProcessPoolExecutor:
    """The warm worker processes for this embedder version (started once, kept for later jobs;
    one set at a time)."""
    record, checkpoint = target.record, target.checkpoint
    fields = None
    if checkpoint is not None:
        fields = {k: getattr(checkpoint, k) for k in ("id", "path", "sha256", "config", "version")}
    key = (str(ctx.settings.data_dir), record.embedder, record.embedder_version, workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None and getattr(pool, "_broken", False):  # a worker died while idle
            pool.shutdown(wait=False, cancel_futures=True)
            del _POOLS[key]
            pool = None
        if pool is None:
            for old in _POOLS.values():
                old.shutdown(wait=False, cancel_futures=True)
            _POOLS.clear()
            pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded server
                initializer=_worker_init,
                initargs=(ctx.settings.model_dump_json(), record.embedder, fields, record.embedder_version),
            )
            _POOLS[key] = pool
        return pool


def forget_worker_pool(_: Any = None) -> None:
    """Drop broken pools; the next chunk starts a new one."""
    with _POOLS_LOCK:
        for key, pool in list(_POOLS.items()):
            if getattr(pool, "_broken", False):
                pool.shutdown(wait=False, cancel_futures=True)
                del _POOLS[key]


def shutdown_worker_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.shutdown(wait=True, cancel_futures=True)
        _POOLS.clear()


def _stack(vectors: list[np.ndarray | None]) -> np.ndarray | None:
    """Rows aligned with the accepted members; members known as stored (duplicates, never
    written) get zeros, which nothing reads."""
    dims = {v.shape[0] for v in vectors if v is not None}
    if not dims:
        return None
    (dim,) = dims
    out = np.zeros((len(vectors), dim), dtype=np.float32)
    for i, vector in enumerate(vectors):
        if vector is not None:
            out[i] = vector
    return out


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class Pipeline:
    """One import's stages; ``run`` drives them and returns when the source is exhausted or
    ``should_stop`` says so (after the batch being written)."""

    def __init__(self, ctx: AppContext, collection: str, *, workers: int | None = None) -> None:
        self.ctx = ctx
        self.collection = collection
        self.target = resolve_target(ctx, collection)
        self.batch_size = ctx.settings.import_batch_size
        self.depth = ctx.settings.import_queue_depth
        self.processes = use_processes(ctx, self.target)
        self.workers = workers or default_workers(ctx, processes=self.processes)
        self._stop = threading.Event()
        # Seconds each stage spent working (not waiting), for progress reports and benchmarks.
        self.busy: dict[str, float] = {"read": 0.0, "decode": 0.0, "embed": 0.0, "write": 0.0}
        self._busy_lock = threading.Lock()

    def _count(self, stage: str, seconds: float) -> None:
        with self._busy_lock:
            self.busy[stage] += seconds

    # -- stage 1: read ---------------------------------------------------------------------
    def read(self, members: Iterable[Member], *, start: int = 0) -> Iterator[Chunk]:
        """Members from ``start`` on, read and hashed, in chunks; stored bytes flagged ``known``."""
        items: list[Staged] = []
        nbytes = 0
        position = -1
        began = time.perf_counter()
        for position, member in enumerate(map(screened, members)):  # bad text: rejected, never read
            if self._stop.is_set():
                return
            if position < start:
                continue  # committed before a restart: never read again
            staged = Staged(position, Item(member.name, b"", member.metadata))
            if member.reject is not None:
                code, detail = member.reject
                # A list naming the same entry twice (duplicate_url): a duplicate, not a failure.
                status = "duplicate" if code.startswith("duplicate") else "rejected"
                staged.result = ItemResult(member.name, status, code=code, detail=detail)
            else:
                assert member.read is not None
                try:
                    data = member.read()
                except CbirError as exc:  # found bad while read (a bomb, a file gone): its code
                    staged.result = ItemResult(member.name, "rejected", code=exc.code, detail=exc.detail)
                except Exception as exc:  # a broken member is that member's problem only
                    staged.result = ItemResult(
                        member.name, "rejected", code="archive_member_unreadable", detail=str(exc)[:300]
                    )
                else:
                    # Bytes after an image's end are neither stored nor hashed, as on upload.
                    staged.item.data = data = strip_trailing(data)
                    staged.sha256 = sha256_hex(data)
                    nbytes += len(data)
            items.append(staged)
            if len(items) >= CHUNK_ITEMS or nbytes >= CHUNK_BYTES:
                self._mark_known(items)
                self._count("read", time.perf_counter() - began)
                yield Chunk(items, position + 1, nbytes)
                items, nbytes = [], 0
                began = time.perf_counter()
        if items:
            self._mark_known(items)
            self._count("read", time.perf_counter() - began)
            yield Chunk(items, position + 1, nbytes)

    def _mark_known(self, items: list[Staged]) -> None:
        shas = [s.sha256 for s in items if s.sha256 is not None]
        if not shas:
            return
        with self.ctx.db.session() as session:
            known = set(
                session.scalars(
                    select(ImageRecord.sha256)
                    .where(ImageRecord.collection_id == self.target.record.id)
                    .where(ImageRecord.sha256.in_(shas))
                )
            )
        for staged in items:
            if staged.sha256 in known:
                staged.known = True

    # -- stage 2: decode -------------------------------------------------------------------
    def decode_one(self, staged: Staged, target: Target | None = None, *, budget: bool = True) -> None:
        """Decode, validate and preprocess one member (on the pool), in the decode memory budget."""
        target = target or self.target
        if staged.result is not None or staged.known:
            return
        began = time.perf_counter()
        try:
            with decoding(self.ctx, staged.item.data, stopped=self._stop.is_set, budget=budget) as decoded:
                staged.format, staged.width, staged.height = decoded.format, decoded.width, decoded.height
                if target.embedder is not None:
                    staged.prepared = target.embedder.preprocess(decoded.image)
        except CbirError as exc:
            staged.result = ItemResult(staged.item.name, "rejected", code=exc.code, detail=exc.detail)
        self._count("decode", time.perf_counter() - began)

    def decode(self, chunk: Chunk, pool: Executor) -> Chunk:
        target = chunk.target = self.target  # a training may switch it: each chunk keeps its own
        if isinstance(pool, ProcessPoolExecutor):
            todo = [s for s in chunk.items if s.result is None and not s.known]
            if todo:
                blobs = [s.item.data for s in todo]
                with held_for_chunk(self.ctx, blobs, stopped=self._stop.is_set) as hold:
                    try:  # the pool of the current version (a new one after a switch or a dead worker)
                        future = worker_pool(self.ctx, target, self.workers).submit(_decode_and_embed, blobs)
                    except (BrokenExecutor, RuntimeError):  # broken or shut down meanwhile: start afresh
                        forget_worker_pool()
                        future = worker_pool(self.ctx, target, self.workers).submit(_decode_and_embed, blobs)
                    hold.until_done(future)
                chunk.decoding, chunk.todo = [future], todo
            return chunk
        chunk.decoding = [pool.submit(self.decode_one, staged, target) for staged in chunk.items]
        return chunk

    def warm(self) -> Executor:
        """The executor ``run`` decodes on; worker processes are started and ready on return."""
        if not self.processes:
            return ThreadPoolExecutor(self.workers, thread_name_prefix="cbir-decode")
        for attempt in (1, 2):
            pool = worker_pool(self.ctx, self.target, self.workers)
            try:
                for future in [pool.submit(_decode_and_embed, []) for _ in range(self.workers)]:
                    future.result()
                return pool
            except BrokenExecutor:
                forget_worker_pool()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- stage 3: embed --------------------------------------------------------------------
    def embed(self, chunk: Chunk) -> Chunk:
        target = chunk.target or self.target
        if chunk.todo:  # decoded and embedded by a worker process
            (future,) = chunk.decoding
            began = time.perf_counter()
            try:
                outcomes = future.result()
            except BrokenExecutor:
                # A worker died (killed, out of memory): start fresh ones for the next chunks and
                # do this one here.
                forget_worker_pool(future)
                for staged in chunk.todo:
                    self.decode_one(staged, target)
                chunk.decoding, chunk.todo = [], []
                return self.embed(chunk)
            for staged, outcome in zip(chunk.todo, outcomes, strict=True):
                if outcome[0] == "rejected":
                    staged.result = ItemResult(
                        staged.item.name, "rejected", code=outcome[1], detail=outcome[2]
                    )
                else:
                    staged.format, staged.width, staged.height, staged.vector = outcome[1:]
                    staged.version = target.record.embedder_version
            chunk.decoding, chunk.todo = [], []
            self._count("embed", time.perf_counter() - began)
            return chunk
        for future in chunk.decoding:
            future.result()
        chunk.decoding = []
        ready = [s for s in chunk.items if s.prepared is not None]
        embedder = target.embedder
        if ready and embedder is not None:
            began = time.perf_counter()
            step = forward_batch(ready[0].prepared, limit=self.ctx.settings.embed_batch_size)
            for first in range(0, len(ready), step):
                part = ready[first : first + step]
                vectors = embedder.embed_prepared([s.prepared for s in part])
                for staged, vector in zip(part, vectors, strict=True):
                    staged.vector, staged.prepared = vector, None
                    staged.version = target.record.embedder_version
            self._count("embed", time.perf_counter() - began)
        return chunk

    # -- stage 4: write --------------------------------------------------------------------
    def write(
        self, chunks: list[Chunk], *, in_transaction: Callable[[Any, list[ItemResult], int], None] | None
    ) -> list[ItemResult]:
        """Store consecutive chunks in one transaction; ``in_transaction(session, results, end)``
        runs inside it (a job's counters and cursor)."""
        began = time.perf_counter()
        staged = [s for chunk in chunks for s in chunk.items]
        end = chunks[-1].end
        with WRITE_LOCK:
            self._refresh(staged)
            results: list[ItemResult | None] = [s.result for s in staged]
            accepted: list[Accepted] = []
            vectors: list[np.ndarray | None] = []
            for i, s in enumerate(staged):
                if s.result is None:
                    assert s.sha256 is not None and s.format is not None
                    accepted.append(Accepted(i, s.item, s.sha256, s.format, s.width, s.height))
                    vectors.append(s.vector)
            matrix = _stack(vectors) if self.target.trained else None

            def hook(session: Any) -> None:
                if in_transaction is not None:
                    in_transaction(session, [r for r in results if r is not None], end)

            store_accepted(
                self.ctx,
                record=self.target.record,
                accepted=accepted,
                vectors=matrix,
                results=results,
                durable=False,
                in_transaction=hook,
            )
        self._count("write", time.perf_counter() - began)
        return [r for r in results if r is not None]

    def _refresh(self, staged: list[Staged]) -> None:
        """Under the write lock: if another writer switched the served version since we embedded
        (a training), embed again with it; a member flagged ``known`` whose image was deleted since
        is decoded and embedded now."""
        with self.ctx.db.session() as session:
            live = require_collection(session, self.collection)
            if live.embedder_version != self.target.record.embedder_version:
                self.target = Target(self.ctx, live, checkpoint_of(session, live))
            else:
                self.target.record = live  # index settings may have changed; the embedder has not
            known = [s.sha256 for s in staged if s.known]
            stored = (
                set(
                    session.scalars(
                        select(ImageRecord.sha256)
                        .where(ImageRecord.collection_id == live.id)
                        .where(ImageRecord.sha256.in_(known))
                    )
                )
                if known
                else set()
            )
        version = live.embedder_version
        # Embedded by another version than the one served now (a training or whitening switched
        # it while these were on their way), or flagged known but deleted since.
        redo = [
            s
            for s in staged
            if s.result is None
            and ((s.known and s.sha256 not in stored) or (not s.known and s.version != version))
        ]
        for s in redo:
            s.known = False
            s.vector = s.version = None
            self.decode_one(s, self.target, budget=False)  # under the write lock: never wait
        if redo:
            self.embed(Chunk(redo, 0, 0, target=self.target))
        for s in staged:
            if s.known and s.result is None and s.format is None:
                # Still stored: the writer answers it as a duplicate; the row needs no decode.
                s.format, s.width, s.height = "PNG", 0, 0

    # -- the whole pipeline ----------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(
        self,
        members: Iterable[Member],
        *,
        start: int = 0,
        in_transaction: Callable[[Any, list[ItemResult], int], None] | None = None,
        after_commit: Callable[[list[ItemResult], int], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Import every member from ``start`` on; True when the source was exhausted, False when
        ``should_stop`` ended it early (after a commit)."""
        decoded: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        embedded: queue.Queue[Any] = queue.Queue(maxsize=self.depth)

        def put(q: queue.Queue[Any], value: Any) -> bool:
            while not self._stop.is_set():
                try:
                    q.put(value, timeout=_PUT_WAIT_S)
                    return True
                except queue.Full:
                    continue
            return False

        def read_and_decode(pool: ThreadPoolExecutor) -> None:
            try:
                for chunk in self.read(members, start=start):
                    if not put(decoded, self.decode(chunk, pool)):
                        return
                put(decoded, _END)
            except BaseException as exc:
                put(decoded, _Failed(exc))

        def embed_stage() -> None:
            try:
                while not self._stop.is_set():
                    try:
                        chunk = decoded.get(timeout=_PUT_WAIT_S)
                    except queue.Empty:
                        continue
                    if chunk is _END or isinstance(chunk, _Failed):
                        put(embedded, chunk)
                        return
                    if not put(embedded, self.embed(chunk)):
                        return
            except BaseException as exc:
                put(embedded, _Failed(exc))

        finished = False
        pool = self.warm()
        try:
            threads = [
                threading.Thread(target=read_and_decode, args=(pool,), name="cbir-read", daemon=True),
                threading.Thread(target=embed_stage, name="cbir-embed", daemon=True),
            ]
            for thread in threads:
                thread.start()
            try:
                batch: list[Chunk] = []
                while True:
                    try:
                        chunk = embedded.get(timeout=_PUT_WAIT_S)
                    except queue.Empty:
                        if self._stop.is_set():
                            break  # shutting down: what was not committed is read again on resume
                        continue
                    if isinstance(chunk, _Failed):
                        raise chunk.exc
                    if chunk is not _END:
                        batch.append(chunk)
                    size = sum(len(c.items) for c in batch)
                    nbytes = sum(c.nbytes for c in batch)
                    if batch and (chunk is _END or size >= self.batch_size or nbytes >= COMMIT_BYTES):
                        results = self.write(batch, in_transaction=in_transaction)
                        if after_commit is not None:
                            after_commit(results, batch[-1].end)
                        batch = []
                        if should_stop():
                            break
                    if chunk is _END:
                        finished = True
                        break
            finally:
                self._stop.set()
                for thread in threads:
                    thread.join()
        finally:
            if isinstance(pool, ThreadPoolExecutor):
                pool.shutdown(wait=True)
        return finished
