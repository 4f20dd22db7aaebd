"""Issue 4's acceptance run: all 70,000 MNIST digits through the HTTP endpoint, twice per source.

Starts a real server (uvicorn, SQLite in a scratch data folder, CBIR_IMPORT_ROOTS = the datasets
folder) and imports

1. the MNIST IDX files as a server folder (``{"folder": ".../mnist", "layout": "idx"}``), then again;
2. a zip of the same 70,000 digits as PNGs (written here, streamed up as multipart), then again,

each into its own collection, and checks the exact counts: the first run adds 70,000 (0
duplicates, 0 failed; the collection has 70,000 rows and 70,000 vectors in its index), the second
adds 0 and reports 70,000 duplicates. Prints a table and, with ``--json``, one JSON line.

    python benchmarks/import_mnist70k.py [--embedder tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.ingest.sources.datasets import load_mnist, png_bytes  # noqa: E402
from tests.liveserver import DATASETS_DIR, LiveServer  # noqa: E402

TOTAL = 70_000


def write_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for split in ("train", "test"):
            images, labels = load_mnist(split, datasets_dir=DATASETS_DIR, download_dir=path.parent)
            for i in range(len(images)):
                archive.writestr(f"{labels[i]}/{split}-{i:05d}.png", png_bytes(images[i]))


def wait(server: LiveServer, job_id: str, *, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = server.api("GET", f"/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} did not finish in {timeout} s: {job}")
        time.sleep(0.5)


def run_import(server: LiveServer, collection: str, *, folder: Path | None, archive: Path | None) -> dict:
    began = time.perf_counter()
    if folder is not None:
        response = server.api(
            "POST", f"/collections/{collection}/imports", json={"folder": str(folder), "layout": "idx"}
        )
    else:
        assert archive is not None
        with open(archive, "rb") as handle:
            response = server.api(
                "POST",
                f"/collections/{collection}/imports",
                files={"file": (archive.name, handle, "application/zip")},
            )
    if response.status_code != 202:
        raise SystemExit(f"import refused: {response.status_code} {response.text}")
    job = wait(server, response.json()["job_id"])
    info = server.api("GET", f"/collections/{collection}").json()
    return {
        "state": job["state"],
        "total": job["total"],
        "added": job["added"],
        "duplicates": job["duplicates"],
        "failed": job["failed"],
        "images": info["image_count"],
        "indexed": info["index_size"],
        "seconds": round(time.perf_counter() - began, 1),
        "images_per_second": job["images_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--embedder", default="tiny", help="the collections' embedder (one that needs no training)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbir-70k-") as scratch:
        root = Path(scratch)
        print("writing the zip of 70,000 PNGs ...", file=sys.stderr)
        write_zip(root / "mnist70k.zip")
        server = LiveServer(
            root / "data",
            root / "server.log",
            # a scratch server on loopback: keys off (server-folder imports need an admin key otherwise)
            env={"CBIR_IMPORT_ROOTS": str(DATASETS_DIR.resolve()), "CBIR_AUTH": "off"},
        ).start()
        try:
            for source in ("idx", "zip"):
                name = f"mnist-{source}"
                created = server.api("POST", "/collections", json={"name": name, "embedder": args.embedder})
                if created.status_code != 201:
                    raise SystemExit(created.text)
                for attempt in ("first", "again"):
                    print(f"importing {source} ({attempt}) ...", file=sys.stderr)
                    result = run_import(
                        server,
                        name,
                        folder=(DATASETS_DIR / "mnist").resolve() if source == "idx" else None,
                        archive=root / "mnist70k.zip" if source == "zip" else None,
                    )
                    rows.append({"source": source, "run": attempt, **result})
        finally:
            server.stop()
    ok = all(
        r["state"] == "succeeded"
        and r["total"] == TOTAL
        and r["failed"] == 0
        and r["images"] == r["indexed"] == TOTAL
        and (r["added"], r["duplicates"]) == ((TOTAL, 0) if r["run"] == "first" else (0, TOTAL))
        for r in rows
    )
    head = (
        f"{'source':<7} {'run':<6} {'state':<10} {'total':>7} {'added':>7} {'dups':>7} {'failed':>6} "
        f"{'rows':>7} {'indexed':>7} {'seconds':>8} {'img/s':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        counts = f"{r['total']:>7} {r['added']:>7} {r['duplicates']:>7} {r['failed']:>6}"
        print(
            f"{r['source']:<7} {r['run']:<6} {r['state']:<10} {counts} "
            f"{r['images']:>7} {r['indexed']:>7} {r['seconds']:>8} {r['images_per_second']:>8}"
        )
    print("exact counts:", "yes" if ok else "NO")
    if args.json:
        print(json.dumps({"embedder": args.embedder, "runs": rows, "exact": ok}))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
