"""``cbir bench search``: one collection's search latency through each vector store backend.

The collection's stored vectors are read from the database (``app.data.vector_rows``), with each
image's label and created time as the stores' scalar fields, and loaded into every backend asked
for: ``faiss`` (``index.faiss_store``, in this process) and ``milvus`` (``index.milvus_store``
against a ``milvus-lite server`` this run starts on 127.0.0.1 and a free port, on a temporary data
folder, and stops at its end; flushed after the load, as a bulk load should be).

The queries are noisy copies of stored vectors (half the typical nearest-neighbour distance, as
``cbir bench index`` does), so that no query finds itself; each is timed alone, end to end through
the store's ``search`` (for Milvus: the gRPC round trip, the filter expression and the result
parsing). Each query runs twice: plain, and filtered to the label of the image it was copied from
(about a tenth of MNIST). The first backend's answers are the reference for the others' top-k
agreement, a check that both searched the same rows.

milvus-lite is a test double: its latency says what the seam costs on one machine, not what a
Milvus cluster answers in.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from app.bench.embedding import BenchError
from app.bench.indexes import noise_scale
from app.core.settings import Settings
from app.data.db import Database
from app.data.records import CollectionRecord, ImageRecord
from app.data.vector_rows import load_vectors
from index.factories import check_factory
from index.kinds import AUTO, auto_factory
from index.store import UnsupportedKind, VectorStore, Where, space_name

BACKENDS = ("faiss", "milvus")
WARMUP = 5  # queries per backend and mode before the timed ones (connections, caches, threads)


@dataclass(frozen=True)
class Loaded:
    """A collection as the stores take it: parallel ``ids`` (n,) int64, ``vectors`` (n, d) float32
    unit rows, ``labels`` (n,) object (str or None), ``created`` (n,) int64 microseconds UTC."""

    name: str
    embedder_version: str
    kind: str
    ids: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    created: np.ndarray


@dataclass(frozen=True)
class BackendResult:
    name: str
    version: str
    kind: str
    load_s: float  # upsert of every row (and the flush, on Milvus)
    p50_ms: float
    p95_ms: float
    label_p50_ms: float | None  # None: the collection has no labels
    label_p95_ms: float | None
    agree_at_k: float  # top-k overlap with the first backend's answers (1.0 for the first)


@dataclass(frozen=True)
class SearchBench:
    collection: str
    n: int
    dim: int
    k: int
    queries: int
    faiss_threads: int
    backends: list[BackendResult]

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints as its last line."""
        return {
            "collection": self.collection,
            "n": self.n,
            "dim": self.dim,
            "k": self.k,
            "queries": self.queries,
            "faiss_threads": self.faiss_threads,
            "backends": [asdict(backend) for backend in self.backends],
        }


def parse_backends(text: str) -> list[str]:
    """``"faiss,milvus"`` -> ``["faiss", "milvus"]``, or ``BenchError`` for an unknown or repeated
    name."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if not names or unknown or len(set(names)) < len(names):
        raise BenchError(f"--backends takes a comma-separated list of {', '.join(BACKENDS)}, not {text!r}")
    return names


def _microseconds(moment: datetime | None) -> int:
    if moment is None:
        return 0
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they are stored in UTC
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def load_collection(db: Database, *, name: str, kind: str | None = None) -> Loaded:
    """The collection's vectors of its current embedder version, with labels and created times; its
    index kind (``auto`` resolved by size, as the service does) unless ``kind`` is given."""
    with db.session() as session:
        record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == name))
        if record is None:
            raise BenchError(f"no collection named {name!r} (the MNIST demo is built by `cbir demo`)")
        if not record.embedder_version:
            raise BenchError(f"collection {name!r} has no trained embedder yet, so no vectors")
        collection_id, version, factory = record.id, record.embedder_version, record.index_factory
        scalars = session.execute(
            select(ImageRecord.id, ImageRecord.meta, ImageRecord.created_at).where(
                ImageRecord.collection_id == collection_id
            )
        ).all()
    vectors, ids = load_vectors(db, collection_id=collection_id, embedder_version=version)
    if len(ids) == 0:
        raise BenchError(f"collection {name!r} has no vectors of {version}")
    by_id = {int(row[0]): (row[1] or {}, row[2]) for row in scalars}
    labels = np.empty(len(ids), dtype=object)
    created = np.zeros(len(ids), dtype=np.int64)
    for pos, image_id in enumerate(ids.tolist()):
        meta, moment = by_id.get(image_id, ({}, None))
        label = meta.get("label")
        labels[pos] = None if label is None else str(label)
        created[pos] = _microseconds(moment)
    if kind is None:
        kind = auto_factory(len(ids), vectors.shape[1]) if factory == AUTO else factory
    try:
        kind = check_factory(kind, dim=vectors.shape[1]).removeprefix("IDMap2,")
    except ValueError as exc:
        raise BenchError(f"--kind: {exc}") from None
    return Loaded(
        name=name,
        embedder_version=version,
        kind=kind,
        ids=ids,
        vectors=vectors,
        labels=labels,
        created=created,
    )


def make_queries(vectors: np.ndarray, count: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(queries (count, d) float32 unit rows, rows (count,) int64 positions in ``vectors`` they were
    copied from): seeded copies plus Gaussian noise of ``noise_scale``, renormalised."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=count, replace=count > len(vectors))
    scale = noise_scale(vectors, seed=seed) if len(vectors) > 1 else 0.0
    dim = vectors.shape[1]
    noisy = vectors[rows] + rng.standard_normal((count, dim), dtype=np.float32) * np.float32(
        scale / np.sqrt(dim)
    )
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32), rows


def _latencies(
    store: VectorStore, space: str, queries: np.ndarray, *, k: int, wheres: Sequence[Where | None]
) -> tuple[np.ndarray, np.ndarray]:
    """(per-query milliseconds (n,), found ids (n, k)): one query at a time, after a warm-up."""
    for i in range(min(WARMUP, len(queries))):
        store.search(space, queries[i : i + 1], k, where=wheres[i])
    millis = np.empty(len(queries))
    found = np.empty((len(queries), k), dtype=np.int64)
    for i in range(len(queries)):
        started = time.perf_counter()
        _, hits = store.search(space, queries[i : i + 1], k, where=wheres[i])
        millis[i] = (time.perf_counter() - started) * 1000
        found[i] = hits[0]
    return millis, found


def _agreement(found: np.ndarray, reference: np.ndarray) -> float:
    overlaps = [
        len(np.intersect1d(row[row >= 0], ref[ref >= 0])) / max(1, int((ref >= 0).sum()))
        for row, ref in zip(found, reference, strict=True)
    ]
    return float(np.mean(overlaps))


@contextmanager
def open_store(name: str, *, workdir: Path, say: Callable[[str], None]) -> Iterator[tuple[VectorStore, str]]:
    """(the store, its version) of backend ``name``; Milvus on a milvus-lite server started here."""
    if name == "faiss":
        from index.faiss_store import FaissStore

        faiss_store = FaissStore()
        try:
            yield faiss_store, f"faiss {faiss.__version__}"
        finally:
            faiss_store.close()
        return
    from index.milvus_lite import MilvusLiteError, milvus_lite_server

    with ExitStack() as stack:
        try:
            uri = stack.enter_context(milvus_lite_server(workdir / "milvus"))
            from index.milvus_store import MilvusStore

            milvus_store = MilvusStore(uri, timeout=60.0)
        except (MilvusLiteError, ImportError) as exc:
            raise BenchError(f"the milvus backend needs a milvus-lite server: {exc}") from None
        stack.callback(milvus_store.close)
        version = milvus_store.server_version
        say(f"milvus: {version} serving on {uri}")
        yield milvus_store, version


def bench_search(
    settings: Settings,
    *,
    collection: str,
    backends: Sequence[str] = BACKENDS,
    queries: int = 200,
    k: int = 10,
    kind: str | None = None,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> SearchBench:
    """Load ``collection`` into each backend and time ``queries`` searches of ``k``, plain and with
    a label filter; see the module docstring."""
    db = Database(settings.sqlalchemy_url, read_only=True)
    try:
        data = load_collection(db, name=collection, kind=kind)
    except SQLAlchemyError as exc:  # no database yet (a fresh data folder), or not reachable
        raise BenchError(
            f"cannot read collection {collection!r} from the database ({getattr(exc, 'orig', exc)}); "
            "the MNIST demo is built by `cbir demo`"
        ) from None
    finally:
        db.dispose()
    n, dim = data.vectors.shape
    say(f"{collection}: {n} vectors of {dim}-d ({data.embedder_version}), kind {data.kind}")
    query_rows, sources = make_queries(data.vectors, queries, seed=seed)
    has_labels = any(label is not None for label in data.labels)
    plain: list[Where | None] = [None] * len(query_rows)
    by_label: list[Where | None] = [Where(labels=(data.labels[row],)) for row in sources]
    space = space_name(collection_id=0, embedder_version=data.embedder_version, prefix="bench")

    results: list[BackendResult] = []
    reference: np.ndarray | None = None
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.tmp_dir, prefix="bench-search-") as workdir:
        for name in backends:
            with open_store(name, workdir=Path(workdir), say=say) as (store, version):
                try:
                    store.create(space, dim=dim, kind=data.kind)
                except UnsupportedKind as exc:
                    raise BenchError(f"{name} cannot build {data.kind}: {exc} (try --kind Flat)") from None
                started = time.perf_counter()
                store.upsert(
                    space, ids=data.ids, vectors=data.vectors, labels=list(data.labels), created=data.created
                )
                flush = getattr(store, "flush", None)
                if flush is not None:
                    flush(space)
                load_s = time.perf_counter() - started
                if store.count(space) != n:
                    raise BenchError(f"{name} holds {store.count(space)} vectors after loading {n}")
                say(f"{name}: {n} vectors loaded in {load_s:.2f} s; timing {len(query_rows)} queries")
                millis, found = _latencies(store, space, query_rows, k=k, wheres=plain)
                label_millis, label_found = (
                    _latencies(store, space, query_rows, k=k, wheres=by_label) if has_labels else (None, None)
                )
                answers = found if label_found is None else np.concatenate([found, label_found])
                reference = answers if reference is None else reference
                results.append(
                    BackendResult(
                        name=name,
                        version=version,
                        kind=data.kind,
                        load_s=round(load_s, 3),
                        p50_ms=round(float(np.percentile(millis, 50)), 3),
                        p95_ms=round(float(np.percentile(millis, 95)), 3),
                        label_p50_ms=None
                        if label_millis is None
                        else round(float(np.percentile(label_millis, 50)), 3),
                        label_p95_ms=None
                        if label_millis is None
                        else round(float(np.percentile(label_millis, 95)), 3),
                        agree_at_k=round(_agreement(answers, reference), 4),
                    )
                )
                store.drop(space)
    return SearchBench(
        collection=collection,
        n=n,
        dim=dim,
        k=k,
        queries=len(query_rows),
        faiss_threads=faiss.omp_get_max_threads(),
        backends=results,
    )


def table(result: SearchBench) -> str:
    """A Markdown table of the run."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"{result.collection}: n = {result.n}, dim = {result.dim}, k = {result.k}, {result.queries} queries "
        f"one at a time (noisy copies of stored vectors); label filter: the query's own label; "
        f"FAISS on {result.faiss_threads} threads",
        "",
        "| Backend | Version | Kind | Load s | p50 ms | p95 ms | p50 ms, label filter "
        f"| p95 ms, label filter | Top-{result.k} agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in result.backends:
        lines.append(
            f"| {b.name} | {b.version} | `{b.kind}` | {b.load_s:.2f} | {ms(b.p50_ms)} | {ms(b.p95_ms)} "
            f"| {ms(b.label_p50_ms)} | {ms(b.label_p95_ms)} | {b.agree_at_k:.3f} |"
        )
    return "\n".join(lines)
