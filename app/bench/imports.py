"""Import throughput: the whole pipeline against each of its stages run alone, in one run.

``cbir bench import`` runs each workload twice, in two fresh data folders with the same
collection set-up (so neither run finds the other's files or rows):

- stages alone, one after the other on the same members: read (bytes and SHA-256), decode
  (decode, validate and preprocess on the worker pool), embed (forward passes over the decoded
  inputs, all of them held in memory), write (files, rows, vectors and index additions in the
  pipeline's batches);
- end to end: the pipeline itself, its stages overlapping on their threads.

The ratio end-to-end / slowest stage alone says how well the stages overlap: 1.0 means the
pipeline runs as fast as its bottleneck allows.

Workloads: ``mnist`` (MNIST training digits as PNGs in a zip, the CDAE trained for one epoch on
2,000 other digits first, as ``cbir train cdae`` does) and ``holidays`` (the INRIA Holidays dev
folder of JPEGs, efficientnet_lite0 codes).
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.bench.embedding import BenchError
from app.catalog.collections import create_collection
from app.context import AppContext, open_context
from app.core.settings import Settings
from app.ingest.pipeline import Chunk, Pipeline
from app.ingest.sources.archive import check_archive
from app.ingest.sources.datasets import load_mnist, png_bytes
from app.ingest.sources.kinds import DatasetSource, FolderSource, Source, members_of
from app.ingest.stages import forward_batch, time_stages
from app.learning.training import train_cdae

WORKLOADS = ("mnist", "holidays")
HOLIDAYS_FOLDER = Path("inria-holidays-dev") / "jpg"  # under CBIR_DATASETS_DIR
STAGES = ("read", "decode", "embed", "write")


@dataclass(frozen=True)
class WorkloadResult:
    name: str
    embedder: str
    images: int
    end_to_end_img_s: float
    stage_img_s: dict[str, float]
    peak_rss_mb: float
    mode: str = ""  # how the pipeline decoded and embedded: "1 process", "2 threads"
    # Photo sets: the forward passes alone over the run's preprocessed inputs (see forward_alone)
    raw_forward_img_s: float | None = None
    runtime: str | None = None  # which runtime computed the codes: torch or onnx

    @property
    def slowest_stage(self) -> str:
        return min(self.stage_img_s, key=lambda s: self.stage_img_s[s])

    @property
    def slowest_stage_img_s(self) -> float:
        return self.stage_img_s[self.slowest_stage]

    @property
    def ratio(self) -> float:
        return self.end_to_end_img_s / self.slowest_stage_img_s

    @property
    def ratio_to_forward(self) -> float | None:
        if not self.raw_forward_img_s:
            return None
        return self.end_to_end_img_s / self.raw_forward_img_s

    def as_json(self) -> dict[str, object]:
        forward = {}
        if self.raw_forward_img_s is not None:
            forward = {
                "raw_forward_img_s": round(self.raw_forward_img_s, 1),
                "ratio_to_forward": round(self.ratio_to_forward or 0.0, 3),
                "runtime": self.runtime,
            }
        return {
            "name": self.name,
            "embedder": self.embedder,
            "images": self.images,
            "end_to_end_img_s": round(self.end_to_end_img_s, 1),
            "slowest_stage": self.slowest_stage,
            "slowest_stage_img_s": round(self.slowest_stage_img_s, 1),
            "ratio": round(self.ratio, 3),
            "stage_img_s": {k: round(v, 1) for k, v in self.stage_img_s.items()},
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "mode": self.mode,
            **forward,
        }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


@dataclass
class _Setup:
    embedder: str
    make_source: Callable[[Path], Source]  # given a scratch folder
    prepare: Callable[[AppContext, str], None]  # after the collection exists, before timing


def _mnist_setup(settings: Settings, images: int) -> _Setup:
    train, _ = load_mnist(
        "train", datasets_dir=settings.datasets_dir, download_dir=settings.data_dir / "datasets"
    )
    if images > len(train):
        raise BenchError(f"MNIST train has {len(train)} images, not {images}")

    def make_source(scratch: Path) -> Source:
        path = scratch / "mnist-train.zip"
        if not path.exists():
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
                for i in range(images):
                    archive.writestr(f"digits/{i:05d}.png", png_bytes(train[i]))
        return check_archive(path, path.name)

    def prepare(ctx: AppContext, collection: str) -> None:
        # Train the CDAE on 2,000 test digits (not the timed ones), one epoch, as `cbir train cdae`.
        seed = members_of(DatasetSource("mnist", "test"), ctx.settings)
        Pipeline(ctx, collection).run(_first(seed, 2000))
        train_cdae(ctx, collection=collection, epochs=1)

    return _Setup("cdae", make_source, prepare)


def _holidays_setup(settings: Settings) -> _Setup:
    folder = (settings.datasets_dir or Path("datasets")) / HOLIDAYS_FOLDER
    if not folder.is_dir():
        raise BenchError(f"no Holidays folder at {folder} (set CBIR_DATASETS_DIR)")
    return _Setup("efficientnet_lite0", lambda scratch: FolderSource(folder.resolve()), lambda ctx, c: None)


def _first(members: Iterator, n: int) -> Iterator:  # type: ignore[type-arg]
    for i, member in enumerate(members):
        if i >= n:
            return
        yield member


def _timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def _runtime_ready(pipeline: Pipeline) -> str | None:
    """Load the embedder and make its runtime choice now (the service makes it in the background,
    torch serving until then), so that no timing mixes runtimes; returns torch or onnx, or None
    (not a CNN, or embedded in worker processes)."""
    if pipeline.processes:
        return None
    embedder = pipeline.target.embedder
    if embedder is None:
        return None
    embedder.prepare_runtime()
    runtime = getattr(embedder, "active_runtime", None)
    return str(runtime) if runtime else None


def forward_alone(pipeline: Pipeline, chunks: list[Chunk]) -> float | None:
    """Images/s of the embedder's forward passes alone (``embed_prepared``: views batched by
    shape, pooling, normalisation) over every preprocessed input of the run, held in memory: the
    best of one image per pass and of the largest batch within the memory cap (``forward_batch``),
    each after an untimed pass. None when nothing was preprocessed here (worker processes)."""
    embedder = pipeline.target.embedder
    prepared = [s.prepared for chunk in chunks for s in chunk.items if s.prepared is not None]
    if embedder is None or not prepared:
        return None
    cap = forward_batch(prepared[0], limit=pipeline.ctx.settings.embed_batch_size)
    best = 0.0
    for step in sorted({1, cap}):
        embedder.embed_prepared(prepared[:step])
        began = time.perf_counter()
        for first in range(0, len(prepared), step):
            embedder.embed_prepared(prepared[first : first + step])
        best = max(best, len(prepared) / max(time.perf_counter() - began, 1e-9))
    return best


@dataclass
class _Alone:
    members: int
    stage_img_s: dict[str, float]
    raw_forward_img_s: float | None
    runtime: str | None


def _stages_alone(ctx: AppContext, collection: str, source: Source) -> _Alone:
    """Each stage over all members, one stage at a time, and the forward passes alone."""
    pipeline = Pipeline(ctx, collection)
    runtime = _runtime_ready(pipeline)
    raw_forward = None
    members = members_of(source, ctx.settings)
    chunks: list[Chunk] = []
    seconds = {"read": _timed(lambda: chunks.extend(pipeline.read(members)))}
    n = sum(len(c.items) for c in chunks)
    if pipeline.processes:
        _worker_stages(pipeline, chunks, seconds)
    else:
        with ThreadPoolExecutor(pipeline.workers, thread_name_prefix="bench-decode") as pool:

            def decode_all() -> None:
                for chunk in chunks:
                    pipeline.decode(chunk, pool)
                for chunk in chunks:
                    for future in chunk.decoding:
                        future.result()
                    chunk.decoding = []

            seconds["decode"] = _timed(decode_all)
        raw_forward = forward_alone(pipeline, chunks)
        seconds["embed"] = _timed(lambda: [pipeline.embed(chunk) for chunk in chunks])

    def write_all() -> None:
        batch: list[Chunk] = []
        for chunk in chunks:
            batch.append(chunk)
            if sum(len(c.items) for c in batch) >= pipeline.batch_size:
                pipeline.write(batch, in_transaction=None)
                batch = []
        if batch:
            pipeline.write(batch, in_transaction=None)

    seconds["write"] = _timed(write_all)
    rates = {stage: n / max(seconds[stage], 1e-9) for stage in STAGES}
    return _Alone(n, rates, raw_forward, runtime)


def _worker_stages(pipeline: Pipeline, chunks: list[Chunk], seconds: dict[str, float]) -> None:
    """Decode and embed alone where the pipeline runs them, in its worker processes: each worker
    times its decoding of a chunk, then its embedding of it; a stage's seconds are the summed
    worker seconds over the worker count. Then the chunks are decoded and embedded for real
    (untimed), so the write stage has what it needs."""
    pool = pipeline.warm()
    blobs = [[s.item.data for s in chunk.items if s.result is None and not s.known] for chunk in chunks]
    timings = list(pool.map(time_stages, blobs))
    seconds["decode"] = sum(d for d, _ in timings) / pipeline.workers
    seconds["embed"] = sum(e for _, e in timings) / pipeline.workers
    for chunk in chunks:
        pipeline.decode(chunk, pool)
    for chunk in chunks:
        pipeline.embed(chunk)


def _mode(pipeline: Pipeline) -> str:
    kind = "process" if pipeline.processes else "thread"
    return f"{pipeline.workers} {kind}{'es' if pipeline.processes and pipeline.workers > 1 else ''}" + (
        "s" if not pipeline.processes and pipeline.workers > 1 else ""
    )


def _end_to_end(ctx: AppContext, collection: str, source: Source) -> tuple[int, float, str]:
    pipeline = Pipeline(ctx, collection)
    _runtime_ready(pipeline)
    warm = pipeline.warm()  # worker processes start once per server and embedder version: not timed
    if isinstance(warm, ThreadPoolExecutor):
        warm.shutdown()
    members = members_of(source, ctx.settings)
    counted: list[int] = []
    seconds = _timed(
        lambda: pipeline.run(members, after_commit=lambda results, end: counted.append(len(results)))
    )
    n = sum(counted)
    return n, n / max(seconds, 1e-9), _mode(pipeline)


def _context(settings: Settings, data_dir: Path) -> AppContext:
    return open_context(settings.model_copy(update={"data_dir": data_dir, "database_url": ""}))


def run_workload(settings: Settings, name: str, *, images: int, say: Callable[[str], None]) -> WorkloadResult:
    setup = _mnist_setup(settings, images) if name == "mnist" else _holidays_setup(settings)
    with tempfile.TemporaryDirectory(prefix=f"cbir-bench-import-{name}-") as scratch:
        root = Path(scratch)
        source = setup.make_source(root)
        alone: _Alone | None = None
        e2e: tuple[int, float, str] | None = None
        for run in ("alone", "end_to_end"):
            if run == "end_to_end" and (root / "alone" / "onnx").is_dir():
                # the same ONNX export and runtime choice as the run of the stages alone
                shutil.copytree(root / "alone" / "onnx", root / run / "onnx")
            ctx = _context(settings, root / run)
            try:
                create_collection(ctx, name="bench", embedder=setup.embedder)
                say(f"{name}: preparing the {run.replace('_', '-')} run ({setup.embedder})")
                setup.prepare(ctx, "bench")
                say(f"{name}: timing {run.replace('_', '-')}")
                if run == "alone":
                    alone = _stages_alone(ctx, "bench", source)
                else:
                    e2e = _end_to_end(ctx, "bench", source)
            finally:
                ctx.close()
    assert alone is not None and e2e is not None
    e2e_n, e2e_rate, mode = e2e
    if alone.members != e2e_n:
        raise BenchError(f"the runs saw different members: {alone.members} alone, {e2e_n} end to end")
    return WorkloadResult(
        name=name,
        embedder=setup.embedder,
        images=e2e_n,
        end_to_end_img_s=e2e_rate,
        stage_img_s=alone.stage_img_s,
        peak_rss_mb=peak_rss_mb(),
        mode=mode,
        raw_forward_img_s=alone.raw_forward_img_s,
        runtime=alone.runtime,
    )


def run_bench(
    settings: Settings, *, workloads: tuple[str, ...], images: int, say: Callable[[str], None]
) -> list[WorkloadResult]:
    out = []
    for name in workloads:
        if name not in WORKLOADS:
            raise BenchError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        out.append(run_workload(settings, name, images=images, say=say))
    return out


def format_table(results: list[WorkloadResult]) -> str:
    head = (
        f"{'workload':<10} {'embedder':<20} {'images':>7} {'e2e img/s':>10} "
        + " ".join(f"{s + ' img/s':>13}" for s in STAGES)
        + f" {'slowest':>8} {'ratio':>6} {'peak RSS MB':>12}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.name:<10} {r.embedder:<20} {r.images:>7} {r.end_to_end_img_s:>10.1f} "
            + " ".join(f"{r.stage_img_s[s]:>13.1f}" for s in STAGES)
            + f" {r.slowest_stage:>8} {r.ratio:>6.2f} {r.peak_rss_mb:>12.0f}  {r.mode}"
            + (
                f"; forward alone {r.raw_forward_img_s:.1f} img/s ({r.runtime}), "
                f"ratio to forward {r.ratio_to_forward:.2f}"
                if r.raw_forward_img_s and r.ratio_to_forward is not None
                else ""
            )
        )
    return "\n".join(rows)
