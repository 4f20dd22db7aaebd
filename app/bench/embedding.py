"""Embedding throughput: the raw forward pass and the real decode + preprocess + forward path.

``cbir bench embed`` measures both on the current device in one run:

- raw: random tensors of the embedder's input shape, ``embed_batch`` (its own forward, pooling and
  normalisation, under inference mode), batch after batch, nothing else;
- pipeline: the image files of a folder read, decoded (``decode_image``, as uploads and imports are)
  and preprocessed by a small thread pool that runs ahead of the forward pass, so the device never
  waits on Pillow while there is work queued; the folder is walked again when the time allows.

Both start after one untimed batch (weights loaded, kernels chosen) and run for at least
``seconds`` and at least one batch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import cycle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.core.errors import CbirError, EmbedderNotReady, WeightsMissing
from app.core.settings import Settings
from app.embedding.embedders import validate_embedder_name
from app.imaging.decode import ImageLimits, decode_image
from models import registry
from models.base import Embedder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
DEFAULT_FOLDER = Path("inria-holidays-dev") / "jpg"  # under CBIR_DATASETS_DIR


class BenchError(CbirError):
    status, code, title = 400, "bench_failed", "Benchmark cannot run"


@dataclass(frozen=True)
class BenchResult:
    embedder: str
    device: str
    batch: int
    raw_img_s: float
    pipeline_img_s: float
    runtime: str = ""  # torch or onnx: what computed the codes
    # the runtime asked for and, for auto, both runtimes' measured images/s (models/runtime_choice.py)
    runtime_choice: dict[str, Any] | None = None

    # for the table only (the JSON line carries the seven fields above)
    version: str = ""
    input_shape: tuple[int, ...] = ()
    threads: int = 1
    workers: int = 1
    raw_images: int = 0
    pipeline_images: int = 0
    folder: str = ""
    folder_images: int = 0

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints: exactly these keys."""
        return {k: v for k, v in asdict(self).items() if k in _SUMMARY_KEYS}


_SUMMARY_KEYS = ("embedder", "device", "batch", "raw_img_s", "pipeline_img_s", "runtime", "runtime_choice")


def default_folder(settings: Settings) -> Path:
    return (settings.datasets_dir or Path("../shared/datasets")) / DEFAULT_FOLDER


def open_embedder(spec: str, *, settings: Settings, device: torch.device) -> Embedder:
    """The embedder of a spec string, loaded; errors say what to do (weights, checkpoints)."""
    canonical = validate_embedder_name(spec)
    if registry.get_spec(canonical).trainable:
        raise EmbedderNotReady(
            f"embedder {canonical!r} is trained per collection; bench measures pretrained and "
            "weight-free embedders (pixels, tiny, the CNNs)"
        )
    embedder = registry.create(
        canonical,
        device=device,
        weights_dir=settings.weights_dir,
        download=settings.weights_download,
        runtime=settings.cnn_runtime,
        onnx_dir=settings.onnx_dir,
    )
    try:
        embedder.load()
    except registry.WeightsMissing as exc:
        raise WeightsMissing(str(exc)) from None
    return embedder


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise BenchError(f"image folder {folder} does not exist; pass --folder or set CBIR_DATASETS_DIR")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BenchError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_view(prepared: Any) -> torch.Tensor:
    """One (C, H, W) tensor of what ``preprocess`` returned (CNNs return a list of views)."""
    return prepared[0] if isinstance(prepared, list | tuple) else prepared


def measure_raw(embedder: Embedder, *, batch: int, seconds: float) -> tuple[float, int, tuple[int, ...]]:
    """(images/s, images, input shape) of ``embed_batch`` on random input of the embedder's shape."""
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    shape = tuple(_first_view(embedder.preprocess(probe)).shape)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((batch, *shape), generator=generator).to(embedder.device)
    embedder.embed_batch(inputs)  # untimed: lazy initialisation, kernel selection
    _synchronise(embedder.device)
    done, start = 0, time.perf_counter()
    while True:
        embedder.embed_batch(inputs)  # returns numpy: the device has finished
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, done, shape


def _prepared(
    files: Sequence[Path], *, embedder: Embedder, limits: ImageLimits, workers: int, ahead: int
) -> Generator[Any, None, None]:
    """What ``preprocess`` makes of each file, in order, forever; a pool of ``workers`` threads keeps
    ``ahead`` images in flight in front of the consumer."""

    def prepare(path: Path) -> Any:
        return embedder.preprocess(decode_image(path.read_bytes(), limits=limits).image)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cbir-bench") as pool:
        queue: deque[Future[Any]] = deque()
        paths = cycle(files)
        try:
            while True:
                while len(queue) < ahead:
                    queue.append(pool.submit(prepare, next(paths)))
                yield queue.popleft().result()
        finally:
            for future in queue:
                future.cancel()


def measure_pipeline(
    embedder: Embedder,
    *,
    files: Sequence[Path],
    batch: int,
    seconds: float,
    limits: ImageLimits,
    workers: int,
) -> tuple[float, int]:
    """(images/s, images) of decode + preprocess (thread pool) overlapped with ``embed_prepared``."""
    # two batches ahead: the next batch is ready when the forward pass of this one ends
    stream = _prepared(files, embedder=embedder, limits=limits, workers=workers, ahead=2 * batch + workers)
    try:
        embedder.embed_prepared([next(stream) for _ in range(batch)])  # untimed, as the raw pass
        done, start = 0, time.perf_counter()
        while True:
            embedder.embed_prepared([next(stream) for _ in range(batch)])
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return done / elapsed, done
    finally:
        stream.close()


def bench_embed(
    *,
    spec: str,
    settings: Settings,
    device: torch.device,
    batch: int,
    folder: Path,
    seconds: float,
    workers: int | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> BenchResult:
    """Raw and pipeline images/s of one embedder on ``device``, measured one after the other."""
    if batch < 1:
        raise BenchError("--batch must be at least 1")
    files = image_files(folder)
    workers = workers or min(4, os.cpu_count() or 1)
    name = validate_embedder_name(spec)
    embedder = open_embedder(name, settings=settings, device=device)
    say(f"raw forward: {name}, batch {batch}, {seconds:g} s ...")
    raw, raw_images, shape = measure_raw(embedder, batch=batch, seconds=seconds)
    say(f"decode + preprocess + forward: {len(files)} files in {folder}, {seconds:g} s ...")
    pipeline, pipeline_images = measure_pipeline(
        embedder,
        files=files,
        batch=batch,
        seconds=seconds,
        limits=ImageLimits.from_settings(settings),
        workers=workers,
    )
    info = embedder.describe()
    return BenchResult(
        embedder=name,
        device=str(device),
        batch=batch,
        raw_img_s=round(raw, 2),
        pipeline_img_s=round(pipeline, 2),
        version=embedder.version,
        runtime=str(info.get("runtime", "torch")),
        runtime_choice=embedder.runtime_info(),
        input_shape=shape,
        threads=torch.get_num_threads(),
        workers=workers,
        raw_images=raw_images,
        pipeline_images=pipeline_images,
        folder=str(folder),
        folder_images=len(files),
    )


def format_table(result: BenchResult) -> list[str]:
    """The lines people read."""
    shape = "x".join(str(s) for s in result.input_shape)
    rows = [
        ("raw forward (random input)", result.raw_img_s, result.raw_images),
        ("decode + preprocess + forward", result.pipeline_img_s, result.pipeline_images),
    ]
    lines = [
        f"embedder  {result.embedder} ({result.version}, runtime {result.runtime})",
        f"device    {result.device}, {result.threads} torch thread(s), {result.workers} decode worker(s)",
        f"input     {shape}, batch {result.batch}",
        f"images    {result.folder} ({result.folder_images} files)",
        *_choice_line(result.runtime_choice),
        "",
        f"{'path':<32} {'images/s':>9} {'ms/image':>9} {'images':>7}",
    ]
    for label, rate, images in rows:
        lines.append(f"{label:<32} {rate:>9.1f} {1000 / rate if rate else float('inf'):>9.1f} {images:>7}")
    return lines


def _choice_line(choice: dict[str, Any] | None) -> list[str]:
    if not choice or choice.get("torch_img_s") is None:
        return []
    shape = "x".join(str(s) for s in choice.get("shape") or ())
    return [
        f"runtime   {choice['requested']}: torch {choice['torch_img_s']} / onnx {choice['onnx_img_s']} "
        f"images/s on {shape} ({choice['reason']}), {choice['active']} chosen"
    ]
