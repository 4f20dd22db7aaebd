"""The bulk-import runner: read -> decode -> embed -> write, each stage on its own thread.

```
 reader thread        decode pool           embed thread        writer (caller's thread)
 bytes, SHA-256,  ->  decode, validate, ->  one forward pass ->  files, rows, vectors and the
 known-duplicate      preprocess            per chunk            job's high-water mark in one
 check per chunk      (GIL released)                             transaction; then the index
```

The stages are those of a single upload (app/ingest/stages.py, ``write_staged`` in
app/ingest/store.py); this module only chooses where they run: decoding threads, or worker
processes that decode and embed a chunk each (``use_processes``).

Chunks of consecutive members travel through bounded queues, so at most a few chunks are in
memory whatever the size of the source. Order is kept end to end: the writer commits members in
source order, and a job's cursor after a commit says exactly which members are done. Members
already stored (same SHA-256 in the collection) skip decoding and embedding. Each stage can also
run alone on prepared input (``cbir bench import`` measures them side by side).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from app.context import AppContext
from app.core.errors import CbirError
from app.data.storage import sha256_hex
from app.imaging.decoding import decoding, held_for_chunk
from app.imaging.image_end import strip_trailing
from app.ingest.screening import screened
from app.ingest.sources.base import Member
from app.ingest.stages import (
    ForwardSizer,
    Item,
    ItemResult,
    Staged,
    Target,
    decode_and_embed,
    decode_staged,
    embed_staged,
    mark_known,
    resolve_target,
    worker_pool,
)
from app.ingest.store import write_staged
from models import registry

CHUNK_ITEMS = 256
CHUNK_BYTES = 16 * 1024 * 1024
COMMIT_BYTES = 64 * 1024 * 1024
_PUT_WAIT_S = 0.2


@dataclass
class Chunk:
    items: list[Staged]
    end: int  # the position after its last member
    nbytes: int
    decoding: list[Future[Any]] = field(default_factory=list)
    todo: list[Staged] = field(default_factory=list)  # sent to a worker process
    target: Target | None = None  # whose embedder decodes and embeds it (set by ``decode``)


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


def default_workers(ctx: AppContext, *, processes: bool) -> int:
    if ctx.settings.import_workers:
        return ctx.settings.import_workers
    cores = os.cpu_count() or 1
    # Processes leave one core to this process (reading, writing); threads share the GIL anyway.
    return max(1, cores - 1) if processes else min(4, cores)


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
        self.sizer = ForwardSizer()  # images per forward pass, by measured throughput
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
                mark_known(self.ctx, self.target, items)
                self._count("read", time.perf_counter() - began)
                yield Chunk(items, position + 1, nbytes)
                items, nbytes = [], 0
                began = time.perf_counter()
        if items:
            mark_known(self.ctx, self.target, items)
            self._count("read", time.perf_counter() - began)
            yield Chunk(items, position + 1, nbytes)

    # -- stage 2: decode -------------------------------------------------------------------
    def decode_one(self, staged: Staged, target: Target | None = None) -> None:
        """Decode, validate and preprocess one member (on the pool), in the decode memory budget."""
        began = time.perf_counter()
        decode_staged(
            staged,
            target or self.target,
            opened=lambda data, side: decoding(self.ctx, data, stopped=self._stop.is_set, min_side=side),
        )
        self._count("decode", time.perf_counter() - began)

    def decode(self, chunk: Chunk, pool: Executor) -> Chunk:
        target = chunk.target = self.target  # a training may switch it: each chunk keeps its own
        if isinstance(pool, ProcessPoolExecutor):
            todo = [s for s in chunk.items if s.result is None and not s.known]
            if todo:
                blobs = [s.item.data for s in todo]
                with held_for_chunk(self.ctx, blobs, stopped=self._stop.is_set) as hold:
                    try:  # the pool of the current version (a new one after a switch or a dead worker)
                        future = worker_pool(self.ctx, target, self.workers).submit(decode_and_embed, blobs)
                    except (BrokenExecutor, RuntimeError):  # broken or shut down meanwhile: start afresh
                        self.ctx.workers.forget_broken()
                        future = worker_pool(self.ctx, target, self.workers).submit(decode_and_embed, blobs)
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
                for future in [pool.submit(decode_and_embed, []) for _ in range(self.workers)]:
                    future.result()
                return pool
            except BrokenExecutor:
                self.ctx.workers.forget_broken()
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
                outcomes, passes = future.result()
            except BrokenExecutor:
                # A worker died (killed, out of memory): start fresh ones for the next chunks and
                # do this one here.
                self.ctx.workers.forget_broken()
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
            for forward in passes:  # the worker's forward passes, counted here
                self.ctx.metrics.embedded("import", **forward)
            self._count("embed", time.perf_counter() - began)
            return chunk
        for future in chunk.decoding:
            future.result()
        chunk.decoding = []
        began = time.perf_counter()
        embed_staged(
            chunk.items,
            target,
            version=target.record.embedder_version,
            limit=self.ctx.settings.embed_batch_size,
            sizer=self.sizer,
            observe=partial(self.ctx.metrics.embedded, "import"),
        )
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

        def hook(session: Any, results: list[ItemResult]) -> None:
            if in_transaction is not None:
                in_transaction(session, results, end)

        # A training may switch the served version meanwhile: the next chunks decode for the new one.
        self.target, results = write_staged(self.ctx, self.target, staged, durable=False, in_transaction=hook)
        self.ctx.metrics.ingest_results("import", results)
        self._count("write", time.perf_counter() - began)
        return results

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
