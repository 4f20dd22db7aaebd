"""Peak memory of the server while it receives and imports a 1 GB archive.

Writes a tar of distinct photo-sized JPEGs (Holidays dev photos, each re-cropped, resized and
noised so no two are alike; about 0.7 MB each) until it holds ``--gigabytes`` of data, starts a
real server (uvicorn, SQLite, a scratch data folder), streams the archive up as multipart and
waits for the import job. Every 0.1 s it samples the resident memory (VmRSS) of the server and of
its worker processes; at the end it reads the server's own high-water mark (VmHWM).

    python benchmarks/import_memory.py [--gigabytes 1.0] [--embedder efficientnet_lite0] [--json]

The JSON line: {"archive_bytes", "images", "job": {...}, "server_peak_rss_mb" (VmHWM),
"server_plus_workers_peak_rss_mb" (sampled), "seconds"}.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.liveserver import DATASETS_DIR, LiveServer  # noqa: E402

HOLIDAYS = DATASETS_DIR / "inria-holidays-dev" / "jpg"


def write_archive(path: Path, *, target_bytes: int, seed: int = 0) -> int:
    """Distinct JPEGs of about 1600x1200 made from the Holidays photos; returns how many."""
    rng = np.random.default_rng(seed)
    photos = sorted(HOLIDAYS.glob("*.jpg"))
    written = 0
    count = 0
    with tarfile.open(path, "w") as archive:
        while written < target_bytes:
            with Image.open(photos[count % len(photos)]) as photo:
                photo = photo.convert("RGB")
                w, h = photo.size
                left, top = rng.integers(0, max(1, w // 8)), rng.integers(0, max(1, h // 8))
                crop = photo.crop((left, top, w - rng.integers(0, max(1, w // 8)), h))
                big = np.asarray(crop.resize((1600, 1200), Image.Resampling.BILINEAR), dtype=np.int16)
            noisy = np.clip(big + rng.integers(-12, 13, size=big.shape), 0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(noisy).save(out, format="JPEG", quality=90)
            data = out.getvalue()
            info = tarfile.TarInfo(f"photos/{count:05d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            written += len(data)
            count += 1
    return count


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (torch's libraries, mapped by the server and by each
    worker) counted once across processes, not once per process as RSS counts them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    """Descendants of ``pid``, whichever of its threads started them."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids + [g for k in kids for g in children(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--embedder", default="efficientnet_lite0")
    parser.add_argument(
        "--threads",
        action="store_true",
        help="CBIR_IMPORT_PROCESSES=0: decode on threads, embed in the server",
    )
    parser.add_argument(
        "--embed-batch", type=int, default=None, help="CBIR_EMBED_BATCH_SIZE: images per forward pass"
    )
    parser.add_argument("--archive", type=Path, default=None, help="reuse (or keep) the archive here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbir-import-memory-") as scratch:
        root = Path(scratch)
        archive = args.archive or root / "photos.tar"
        if archive.exists():
            with tarfile.open(archive) as existing:
                images = sum(1 for m in existing if m.isfile())
        else:
            print(f"writing {args.gigabytes:g} GB of distinct JPEGs ...", file=sys.stderr)
            images = write_archive(archive, target_bytes=int(args.gigabytes * 1024**3))
        size = archive.stat().st_size
        env = {"CBIR_MAX_ARCHIVE_BYTES": str(4 * 1024**3)}
        if args.threads:
            env["CBIR_IMPORT_PROCESSES"] = "0"
        if args.embed_batch:
            env["CBIR_EMBED_BATCH_SIZE"] = str(args.embed_batch)
        server = LiveServer(root / "data", root / "server.log", env=env)
        server.start()
        assert server.process is not None
        pid = server.process.pid
        peak = {"total": 0.0, "server": 0.0, "pss": 0.0}
        workers_seen: set[int] = set()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                server_rss = rss_mb(pid)
                workers_seen.update(children(pid))
                total = server_rss + sum(rss_mb(c) for c in children(pid))
                peak["server"] = max(peak["server"], server_rss)
                peak["total"] = max(peak["total"], total)
                peak["pss"] = max(peak["pss"], pss_mb(pid) + sum(pss_mb(c) for c in children(pid)))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        try:
            created = server.api("POST", "/collections", json={"name": "photos", "embedder": args.embedder})
            if created.status_code != 201:
                raise SystemExit(created.text)
            # One photo first: the model and the worker processes are loaded before the baseline.
            with tarfile.open(archive) as existing:
                first = next(m for m in existing if m.isfile())
                handle = existing.extractfile(first)
                assert handle is not None
                one = Image.open(io.BytesIO(handle.read())).convert("RGB").resize((64, 48))
            out = io.BytesIO()
            one.save(out, format="PNG")
            warm = io.BytesIO()
            with tarfile.open(fileobj=warm, mode="w") as small:
                info = tarfile.TarInfo("warm.png")
                info.size = len(out.getvalue())
                small.addfile(info, io.BytesIO(out.getvalue()))
            warm_job = server.api(
                "POST",
                "/collections/photos/imports",
                files={"file": ("warm.tar", warm.getvalue(), "application/x-tar")},
            ).json()["job_id"]
            while server.api("GET", f"/jobs/{warm_job}").json()["state"] == "running" or (
                server.api("GET", f"/jobs/{warm_job}").json()["state"] == "queued"
            ):
                time.sleep(0.5)
            time.sleep(0.5)
            kids = children(pid)
            commands = [Path(f"/proc/{k}/cmdline").read_bytes()[:80] for k in kids]
            print(f"server {pid}: child processes {commands}", file=sys.stderr)
            baseline = {
                "server": rss_mb(pid),
                "total": rss_mb(pid) + sum(rss_mb(c) for c in children(pid)),
                "pss": pss_mb(pid) + sum(pss_mb(c) for c in children(pid)),
            }
            print(f"uploading {size / 1024**3:.2f} GB ({images} JPEGs) ...", file=sys.stderr)
            with open(archive, "rb") as handle:
                response = server.api(
                    "POST",
                    "/collections/photos/imports",
                    files={"file": ("photos.tar", handle, "application/x-tar")},
                )
            if response.status_code != 202:
                raise SystemExit(f"import refused: {response.status_code} {response.text}")
            job_id = response.json()["job_id"]
            while (job := server.api("GET", f"/jobs/{job_id}").json())["state"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                time.sleep(1)
            seconds = time.perf_counter() - began
            server_hwm = hwm_mb(pid)
        finally:
            stop.set()
            sampler.join()
            server.stop()
    result = {
        "archive_bytes": size,
        "images": images,
        "embedder": args.embedder,
        "job": {k: job[k] for k in ("state", "total", "added", "duplicates", "failed", "images_per_second")},
        "baseline_rss_mb": round(baseline["server"], 1),
        "baseline_plus_workers_rss_mb": round(baseline["total"], 1),
        "server_peak_rss_mb": round(server_hwm, 1),
        "server_sampled_peak_rss_mb": round(peak["server"], 1),
        "server_plus_workers_peak_rss_mb": round(peak["total"], 1),
        "baseline_pss_mb": round(baseline["pss"], 1),
        "peak_pss_mb": round(peak["pss"], 1),
        # what ran, not what was asked: pretrained CNNs import in the server process by default
        "mode": f"{len(workers_seen)} worker process(es)" if workers_seen else "one process",
        "import_processes": not args.threads,
        "embed_batch": args.embed_batch,
        "seconds": round(seconds, 1),
    }
    print(f"archive            {size / 1024**3:.2f} GB, {images} JPEGs, embedder {args.embedder}")
    print(f"job                {result['job']}")
    print(f"before the upload  {baseline['server']:.0f} MB server, {baseline['total']:.0f} MB with workers")
    print(f"server peak RSS    {server_hwm:.0f} MB (VmHWM)")
    print(f"+ worker processes {peak['total']:.0f} MB RSS (sampled every 0.1 s)")
    print(f"all processes PSS  {peak['pss']:.0f} MB peak, {baseline['pss']:.0f} MB before the upload")
    print(f"wall time          {seconds:.0f} s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
