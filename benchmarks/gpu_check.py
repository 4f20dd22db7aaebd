"""The GPU check: every speed figure of the issue's GPU item in one run, one JSON line at the end.

    benchmarks/gpu_check.sh                      # on a CUDA machine: the full sizes
    benchmarks/gpu_check.sh --device cpu --tiny  # anywhere, in seconds (CI runs it so it cannot rot)

Sections (each runs even if another failed; a failure is recorded under ``errors``):

- ``embed``: ``cbir bench embed`` (raw forward and decode + preprocess + forward) for each embedder
  at each batch size; on CUDA the CNNs run under autocast float16 (AMP) on channels-last weights
  and inputs (``models/cnn.py``), on the CPU in the runtime ``CBIR_CNN_RUNTIME`` chooses. An
  embedder whose weights file is missing is listed under ``skipped``.
- ``holidays_import``: ``cbir bench import --workload holidays`` (end to end against each stage alone).
- ``cdae_epoch``: one epoch of the default CDAE on the MNIST train images.
- ``query``: p50 / p95 milliseconds of single searches with an INRIA Holidays photo through the
  service (the FastAPI app in process, no network) over a collection of Holidays photos.

Everything is written under a temporary data folder; weights come from ``CBIR_WEIGHTS_DIR`` (or the
torch hub cache), data sets from ``--datasets`` (default ``CBIR_DATASETS_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FULL = {
    "embedders": "efficientnet_lite0,resnet50",
    "batches": "1,32,256",
    "seconds": 10.0,
    "holidays_images": 0,
    "cdae_images": 0,
    "queries": 200,
    "query_db": 0,
}
TINY = {
    "embedders": "efficientnet_lite0,resnet50",
    "batches": "1,2",
    "seconds": 0.2,
    "holidays_images": 4,
    "cdae_images": 256,
    "queries": 4,
    "query_db": 3,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="small sizes: a CPU run of a few seconds")
    parser.add_argument("--embedders", default=None, help="comma-separated spec strings")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=None, help="per embed figure")
    parser.add_argument("--holidays-images", type=int, default=None, help="0: the whole folder")
    parser.add_argument("--cdae-images", type=int, default=None, help="0: all 60,000 MNIST train images")
    parser.add_argument("--queries", type=int, default=None, help="single searches timed")
    parser.add_argument(
        "--query-db", type=int, default=None, help="photos in the searched collection (0: all)"
    )
    parser.add_argument("--datasets", type=Path, default=None, help="default: CBIR_DATASETS_DIR")
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def holidays_photos(datasets: Path, n: int) -> list[Path]:
    folder = datasets / "inria-holidays-dev" / "jpg"
    photos = sorted(folder.glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no INRIA Holidays photos in {folder}")
    return photos[:n] if n else photos


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda
        )
    return info


def bench_embeds(
    args: argparse.Namespace, settings: Any, device: torch.device, folder: Path
) -> dict[str, Any]:
    from app.bench.embedding import bench_embed
    from app.core.errors import WeightsMissing

    rows, skipped = [], []
    for spec in args.embedders.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                result = bench_embed(
                    spec=spec,
                    settings=settings,
                    device=device,
                    batch=batch,
                    folder=folder,
                    seconds=args.seconds,
                )
            except WeightsMissing as exc:
                skipped.append({"embedder": spec, "reason": str(exc.detail)})
                break
            rows.append(
                {
                    **result.summary(),
                    "input_shape": list(result.input_shape),
                    "amp": device.type == "cuda",
                    "channels_last": True,
                }
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "skipped": skipped}


def bench_holidays_import(args: argparse.Namespace, settings: Any, scratch: Path) -> dict[str, Any]:
    from app.bench.imports import run_workload

    datasets = args.datasets
    if args.holidays_images:  # copies of the first photos where the bench looks (it skips links)
        datasets = scratch / "datasets"
        folder = datasets / "inria-holidays-dev" / "jpg"
        folder.mkdir(parents=True)
        for photo in holidays_photos(args.datasets, args.holidays_images):
            shutil.copyfile(photo, folder / photo.name)
    local = settings.model_copy(update={"datasets_dir": datasets, "data_dir": scratch / "import-data"})
    local.ensure_dirs()
    return run_workload(local, "holidays", images=0, say=lambda text: None).as_json()  # type: ignore[no-any-return]


def bench_cdae_epoch(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from benchmarks.cdae_mnist import load_mnist
    from models.cdae import train_cdae
    from models.cdae_config import CDAEConfig

    images = load_mnist(args.datasets / "mnist")["train_images"]
    if args.cdae_images:
        images = images[: args.cdae_images]
    config = CDAEConfig.preset("default")
    began = time.perf_counter()
    train_cdae(images, config=config, epochs=1, device=device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return {"images": len(images), "epoch_s": round(seconds, 2), "img_s": round(len(images) / seconds, 1)}


def bench_query(args: argparse.Namespace, settings: Any, scratch: Path) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    photos = holidays_photos(args.datasets, max(args.query_db, 0))
    api = "/api/v1"
    local = settings.model_copy(update={"data_dir": scratch / "query-data"})
    with TestClient(create_app(local)) as client:
        made = client.post(f"{api}/collections", json={"name": "photos", "embedder": "efficientnet_lite0"})
        made.raise_for_status()
        for photo in photos:
            client.post(
                f"{api}/collections/photos/images", files={"file": (photo.name, photo.read_bytes())}
            ).raise_for_status()
        client.app.state.context.embedders.wait_for_runtimes(timeout=600)  # type: ignore[attr-defined]
        runtime = client.get(f"{api}/collections/photos").json().get("runtime")
        latencies, server = [], []
        for i in range(args.queries + 1):
            data = photos[i % len(photos)].read_bytes()
            began = time.perf_counter()
            found = client.post(
                f"{api}/collections/photos/search", params={"k": 10}, files={"file": ("q.jpg", data)}
            )
            elapsed = (time.perf_counter() - began) * 1000
            found.raise_for_status()
            if i:  # the first one warms up
                latencies.append(elapsed)
                server.append(float(found.json().get("timings_ms", {}).get("total", 0.0)))
    latencies.sort()
    return {
        "collection_images": len(photos),
        "queries": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p95_ms": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        "server_p50_ms": round(statistics.median(server), 2),
        "runtime": (runtime or {}).get("active"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from app.core.settings import Settings

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here (try --device cpu)", file=sys.stderr)
        return 2
    datasets = args.datasets or Path(os.environ.get("CBIR_DATASETS_DIR", "../shared/datasets"))
    args.datasets = datasets.resolve()
    out: dict[str, Any] = {"tiny": args.tiny}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cbir-gpu-check-") as tmp:
        scratch = Path(tmp)
        settings = Settings(data_dir=scratch / "data", device=args.device, datasets_dir=args.datasets)
        torch.set_num_threads(settings.torch_threads)
        out.update(device_info(device))
        sections: list[tuple[str, Callable[[], Any]]] = [
            (
                "embed",
                lambda: bench_embeds(args, settings, device, args.datasets / "inria-holidays-dev" / "jpg"),
            ),
            ("holidays_import", lambda: bench_holidays_import(args, settings, scratch)),
            ("cdae_epoch", lambda: bench_cdae_epoch(args, device)),
            ("query", lambda: bench_query(args, settings, scratch)),
        ]
        for name, run in sections:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            began = time.perf_counter()
            try:
                out[name] = run()
            except Exception as exc:  # the other sections still run and report
                traceback.print_exc(file=sys.stderr)
                errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"gpu_check: {name} took {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    out["errors"] = errors
    print(json.dumps(out))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
