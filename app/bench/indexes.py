"""``cbir bench index``: every index kind on vectors that look like real codes, in one run.

Uniform random vectors defeat every approximate index (FACTS.md), so the vectors are real codes:
the 128-d CDAE codes of the 70,000 MNIST digits (a CDAE trained briefly on the training digits,
cached as a ``.npy`` in the data folder), or the rows of ``--codes FILE.npy``. They are tiled to
``n`` rows, each copy with Gaussian noise of about half the typical nearest-neighbour distance
between real codes, and renormalised; the queries are further noisy copies, never added.

For each kind: build time (training included), bytes per vector (the FAISS index as written,
divided by n), queries per second one query at a time on one thread and in batches on all
threads, and recall@10 against the exact top 10 of the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.core.errors import CbirError
from app.core.settings import Settings
from index import SearchKnobs
from index.exact import exact_knn
from index.kinds import configure_construction, ivf_pq_factory

K = 10


class BenchError(CbirError):
    status, code, title = 400, "bench_failed", "Benchmark cannot run"


@dataclass(frozen=True)
class KindResult:
    factory: str
    build_s: float
    bytes_per_vector: float
    qps_1thread: float
    qps: float
    recall_at_10: float
    params: dict[str, Any] = field(default_factory=dict)  # for the table only

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "params"}


@dataclass(frozen=True)
class IndexBench:
    n: int
    dim: int
    exact_qps_1thread: float
    kinds: list[KindResult]
    codes: str = ""
    threads: int = 1
    queries: int = 0

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints as its last line."""
        return {
            "n": self.n,
            "dim": self.dim,
            "exact_qps_1thread": self.exact_qps_1thread,
            "kinds": [kind.summary() for kind in self.kinds],
        }


def default_kinds(n: int, dim: int) -> list[tuple[str, SearchKnobs]]:
    """Exact, graph, IVF-PQ (plain, with OPQ, re-ranked exactly) at sizes fitted to ``n``."""
    ivfpq = ivf_pq_factory(n, dim)
    m = ivfpq.split("PQ")[1]
    return [
        ("Flat", SearchKnobs()),
        ("HNSW32", SearchKnobs(ef_search=64)),
        (ivfpq, SearchKnobs(nprobe=16)),
        (f"OPQ{m},{ivfpq}", SearchKnobs(nprobe=16)),
        (f"{ivfpq},RFlat", SearchKnobs(nprobe=16, k_factor=8)),
    ]


def cdae_codes(settings: Settings, *, dim: int, say: Callable[[str], None] = print) -> np.ndarray:
    """(70000, dim) float32 unit CDAE codes of MNIST (train + test), cached in the data folder."""
    cache = settings.data_dir / "bench" / f"cdae-mnist-codes-{dim}.npy"
    if cache.is_file():
        return np.load(cache)
    import torch

    from app.ingest.sources.datasets import load_mnist
    from models.cdae import CDAEConfig, encode_images, train_cdae

    datasets = settings.datasets_dir or Path("../shared/datasets")
    train, _ = load_mnist("train", datasets_dir=datasets, download_dir=settings.data_dir / "datasets")
    test, _ = load_mnist("test", datasets_dir=datasets, download_dir=settings.data_dir / "datasets")
    config = CDAEConfig.preset("default")
    config = CDAEConfig.from_dict({**config.to_dict(), "code_dim": dim})
    say(f"training a {dim}-d CDAE on the {len(train)} MNIST training digits for one epoch (cached after)")
    result = train_cdae(train, config=config, epochs=1, device=torch.device("cpu"), seed=0)
    images = torch.from_numpy(np.concatenate([train, test]))
    codes = encode_images(result.model, images, config=config).numpy().astype(np.float32)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, codes)
    return codes


def load_codes(path: Path, *, dim: int) -> np.ndarray:
    try:
        codes = np.load(path)
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path} as a .npy array: {exc}") from None
    if codes.ndim != 2 or codes.shape[1] != dim or codes.shape[0] < 2:
        raise BenchError(f"{path} holds an array of shape {codes.shape}; expected (rows, {dim})")
    codes = np.asarray(codes, dtype=np.float32)
    norms = np.linalg.norm(codes, axis=1, keepdims=True)
    if not np.isfinite(codes).all() or (norms == 0).any():
        raise BenchError(f"{path} holds NaN, inf or all-zero rows")
    return codes / norms


def noise_scale(codes: np.ndarray, *, seed: int = 0) -> float:
    """Half the median distance from a code to its nearest other code (sampled)."""
    rng = np.random.default_rng(seed)
    sample = codes[rng.choice(len(codes), size=min(2000, len(codes)), replace=False)]
    _, found = faiss.knn(sample, codes, 2, metric=faiss.METRIC_INNER_PRODUCT)
    # the first hit is the row itself (or an identical one); the second its nearest neighbour
    nearest = np.einsum("ij,ij->i", sample, codes[found[:, 1]])
    return float(0.5 * np.median(np.sqrt(np.maximum(0.0, 2 - 2 * nearest))))


def tile(codes: np.ndarray, n: int, *, scale: float, seed: int) -> np.ndarray:
    """``n`` unit rows: copies of ``codes`` in a seeded order, each plus N(0, scale^2 / d) noise."""
    rng = np.random.default_rng(seed)
    dim = codes.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    order = np.concatenate([rng.permutation(len(codes)) for _ in range(-(-n // len(codes)))])[:n]
    for start in range(0, n, 100_000):
        rows = codes[order[start : start + 100_000]]
        noisy = rows + rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(scale / np.sqrt(dim))
        out[start : start + len(rows)] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def _index(factory: str, dim: int) -> Any:
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    configure_construction(index)  # as the service builds them
    return index


def _knob_params(index: Any, knobs: SearchKnobs) -> Any:
    """Search parameters of the right (nested) types for ``knobs``, or None."""
    swig: Any = faiss
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexRefine):
        return swig.IndexRefineSearchParameters(
            k_factor=float(knobs.k_factor or inner.k_factor),
            base_index_params=_knob_params(inner.base_index, knobs),
        )
    if isinstance(inner, faiss.IndexPreTransform):
        return swig.SearchParametersPreTransform(index_params=_knob_params(inner.index, knobs))
    if isinstance(inner, faiss.IndexIVF):
        return swig.SearchParametersIVF(nprobe=int(knobs.nprobe or inner.nprobe))
    if isinstance(inner, faiss.IndexHNSW):
        return swig.SearchParametersHNSW(efSearch=int(knobs.ef_search or inner.hnsw.efSearch))
    return None


def _qps(search: Callable[[np.ndarray], Any], queries: np.ndarray, *, batch: int, seconds: float) -> float:
    """Queries per second of ``search`` over batches of ``batch`` queries, for about ``seconds``."""
    search(queries[:batch])  # warm up
    done, started = 0, time.perf_counter()
    while True:
        start = done % len(queries)
        chunk = queries[start : start + batch]
        search(chunk)
        done += len(chunk)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= batch:
            return done / elapsed


def bench_index(
    settings: Settings,
    *,
    n: int,
    dim: int,
    codes_file: Path | None = None,
    factories: list[str] | None = None,
    queries: int = 1000,
    threads: int | None = None,
    seconds: float = 2.0,
    train_size: int = 65_536,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> IndexBench:
    """Build and measure every kind on ``n`` tiled real codes of ``dim``; see the module docstring."""
    if n < 1000:
        raise BenchError(f"--n must be at least 1000 (IVF needs vectors to train on), got {n}")
    threads = threads or os.cpu_count() or 1
    codes = load_codes(codes_file, dim=dim) if codes_file else cdae_codes(settings, dim=dim, say=say)
    scale = noise_scale(codes, seed=seed)
    say(f"{len(codes)} real codes, noise scale {scale:.4f}; tiling to {n} x {dim}")
    vectors = tile(codes, n, scale=scale, seed=seed)
    query_rows = tile(codes, queries, scale=scale, seed=seed + 1)
    faiss.omp_set_num_threads(threads)
    truth = exact_knn(query_rows, vectors, K)

    kinds = [(f, SearchKnobs()) for f in factories] if factories else default_kinds(n, dim)
    results: list[KindResult] = []
    exact_qps = 0.0
    for factory, knobs in kinds:
        say(f"{factory}: building")
        faiss.omp_set_num_threads(threads)
        started = time.perf_counter()
        index = _index(factory, dim)
        if not index.is_trained:
            rows = np.random.default_rng(seed).choice(n, size=min(n, train_size), replace=False)
            index.train(vectors[np.sort(rows)])
        for start in range(0, n, 200_000):
            index.add(vectors[start : start + 200_000])
        build_s = time.perf_counter() - started
        params = _knob_params(index, knobs) if knobs else None

        def search(batch: np.ndarray, index: Any = index, params: Any = params) -> Any:
            return index.search(batch, K, params=params)

        _, found = search(query_rows)
        recall = float(
            np.mean([len(np.intersect1d(t, f[f >= 0])) / K for t, f in zip(truth, found, strict=True)])
        )
        with tempfile.TemporaryDirectory(dir=settings.tmp_dir) as folder:
            path = os.path.join(folder, "index.faiss")
            faiss.write_index(index, path)
            size = os.path.getsize(path)
        faiss.omp_set_num_threads(1)
        qps_1 = _qps(search, query_rows, batch=1, seconds=seconds)
        faiss.omp_set_num_threads(threads)
        qps_all = _qps(search, query_rows, batch=min(len(query_rows), 100), seconds=seconds)
        result = KindResult(
            factory=factory,
            build_s=round(build_s, 2),
            bytes_per_vector=round(size / n, 1),
            qps_1thread=round(qps_1, 1),
            qps=round(qps_all, 1),
            recall_at_10=round(recall, 4),
            params=knobs.as_dict(),
        )
        say(
            f"{factory}: build {result.build_s} s, {result.bytes_per_vector} B/vector, "
            f"{result.qps_1thread} q/s (1 thread), {result.qps} q/s ({threads} threads), "
            f"recall@10 {result.recall_at_10}"
        )
        if factory == "Flat":
            exact_qps = result.qps_1thread
        results.append(result)
        del index
    if not exact_qps:  # the exact baseline is always measured
        flat = faiss.IndexFlatIP(dim)
        flat.add(vectors)
        faiss.omp_set_num_threads(1)
        exact_qps = round(_qps(lambda b: flat.search(b, K), query_rows, batch=1, seconds=seconds), 1)
    faiss.omp_set_num_threads(threads)
    return IndexBench(
        n=n,
        dim=dim,
        exact_qps_1thread=exact_qps,
        kinds=results,
        codes=str(codes_file) if codes_file else f"CDAE codes of MNIST ({len(codes)})",
        threads=threads,
        queries=len(query_rows),
    )


def table(result: IndexBench) -> str:
    """A Markdown table of the run (the README's)."""
    lines = [
        f"n = {result.n}, dim = {result.dim}, {result.queries} queries, {result.codes} tiled with noise; "
        f"exact: {result.exact_qps_1thread} q/s on 1 thread",
        "",
        "| Kind (factory) | Search params | Build s | Bytes/vector | q/s, 1 thread "
        f"| q/s, {result.threads} threads | x exact (1 thread) | Recall@10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in result.kinds:
        params = ", ".join(f"{k}={v}" for k, v in kind.params.items()) or "-"
        speedup = kind.qps_1thread / result.exact_qps_1thread if result.exact_qps_1thread else 0.0
        lines.append(
            f"| `{kind.factory}` | {params} | {kind.build_s} | {kind.bytes_per_vector} | {kind.qps_1thread} "
            f"| {kind.qps} | {speedup:.1f} | {kind.recall_at_10} |"
        )
    return "\n".join(lines)
