"""Everything a running service (or one CLI command) holds: built from Settings, closed at the end."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from app.core import faults
from app.core.settings import Settings
from app.core.workers import Workers
from app.data.db import Database
from app.data.orphans import remove_unreferenced_files
from app.data.storage import FileJournal, ImageStore, WriteGate
from app.embedding.cost_cache import CostCache
from app.embedding.embedders import EmbedderCache, validate_embedder_name
from app.imaging.decode import ImageLimits
from app.imaging.decode_budget import DecodeBudget
from app.indexing.manager import IndexManager
from app.indexing.store_manager import StoreIndexManager
from app.metrics.instruments import Metrics
from app.metrics.state import StateCollector
from models.device import pick_device

log = logging.getLogger(__name__)
RUNTIME_CHOICE_WAIT_S = 120


@dataclass
class AppContext:
    settings: Settings
    db: Database
    store: ImageStore
    embedders: EmbedderCache
    # In-process FAISS (CBIR_VECTOR_STORE unset or faiss) or a vector store such as Milvus.
    indexes: IndexManager | StoreIndexManager
    device: torch.device
    # Bytes that decodes in progress may hold at once (CBIR_DECODE_MEMORY_BUDGET_BYTES).
    decode_budget: DecodeBudget
    # Embedders' measured speeds and collections' mean pixel counts, for cost estimates.
    costs: CostCache
    # What GET /metrics shows: this context's counters, and the state it reads at scrape time.
    metrics: Metrics
    # One writer at a time: SQLite allows one anyway, and FAISS add is not thread-safe. Taken by
    # whatever changes rows, vectors or the served embedder version (ingest, training, deletes).
    write_lock: threading.RLock = field(default_factory=threading.RLock)
    # Decoding and file-writing threads, and the bulk import's worker processes.
    workers: Workers = field(default_factory=Workers)
    # Journal names (job owners) of processes found dead on this machine: their jobs are free to
    # take over at once, without waiting for their leases to run out.
    dead_owners: set[str] = field(default_factory=set)

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits.from_settings(self.settings)

    def close(self) -> None:
        # A runtime choice still exporting or timing is waited for (seconds): it writes into the data
        # folder, and a thread left behind would outlive the context that started it.
        if not self.embedders.wait_for_runtimes(timeout=RUNTIME_CHOICE_WAIT_S):
            log.warning(
                "a runtime choice is still running after %d s; it goes on alone", RUNTIME_CHOICE_WAIT_S
            )
        self.workers.close()
        self.indexes.stop()
        if isinstance(self.indexes, StoreIndexManager):
            self.indexes.store.close()
        # Entries still pending belong to writes that never committed: the next start checks them.
        self.store.journal.close(remove=not self.store.journal.pending)
        self.db.dispose()


def open_context(settings: Settings, *, torch_threads: int | None = None) -> AppContext:
    """Validate settings, create folders, migrate the database to head, choose the device."""
    validate_embedder_name(settings.default_embedder)
    faults.check()  # a mistyped CBIR_FAULT_* fails here, not silently never firing
    try:
        device = pick_device(settings.device)
    except ValueError as exc:
        raise SystemExit(f"CBIR_DEVICE: {exc}") from None
    torch.set_num_threads(torch_threads or settings.torch_threads)
    read_only = settings.read_only  # CBIR_READ_ONLY: nothing below writes to the data folder
    if not read_only:
        settings.ensure_dirs()
    db = Database(settings.sqlalchemy_url, read_only=read_only)
    db.migrate()
    metrics = Metrics()
    context = AppContext(
        settings=settings,
        db=db,
        store=ImageStore(
            settings.images_dir,
            journal=None if read_only else FileJournal.open(settings.journal_dir),
            gate=WriteGate(read_only=read_only),
        ),
        embedders=EmbedderCache(settings=settings, device=device),
        indexes=_indexes(settings, db=db, read_only=read_only, metrics=metrics),
        device=device,
        decode_budget=DecodeBudget(settings.decode_budget_bytes),
        costs=CostCache(),
        metrics=metrics,
    )
    metrics.registry.register(StateCollector(db=db, indexes=context.indexes))
    if not read_only:
        remove_unfinished_writes(context)
    context.indexes.start()
    return context


def _indexes(
    settings: Settings, *, db: Database, read_only: bool, metrics: Metrics
) -> IndexManager | StoreIndexManager:
    if settings.vector_store_backend == "faiss":
        return IndexManager(
            db=db,
            index_dir=settings.index_dir,
            sync_rebuild_max=settings.index_sync_rebuild_max,
            read_only=read_only,
            metrics=metrics,
        )
    try:
        from index.milvus_store import MilvusStore  # pymilvus: only where Milvus is asked for
    except ImportError as exc:
        raise SystemExit(f"CBIR_VECTOR_STORE names Milvus but pymilvus is not installed ({exc})") from None
    try:
        store = MilvusStore.from_url(settings.vector_store)
        store.server_version  # noqa: B018 -- a Milvus that is away fails the start, clearly
    except Exception as exc:
        raise SystemExit(f"CBIR_VECTOR_STORE: cannot reach Milvus ({type(exc).__name__}: {exc})") from None
    return StoreIndexManager(
        db=db, store=store, prefix=settings.vector_store_prefix, read_only=read_only, metrics=metrics
    )


def remove_unfinished_writes(context: AppContext) -> None:
    """Files that processes killed before their commit left behind (see FileJournal): at every
    start, and when a worker takes over a job from one that died."""
    for journal in FileJournal.orphaned(context.settings.journal_dir):
        context.dead_owners.add(journal.path.name)
        removed = remove_unreferenced_files(db=context.db, store=context.store, journal=journal)
        if removed:
            log.warning("removed %d image files that a killed process wrote but never committed", removed)
        journal.close(remove=not journal.entries())
