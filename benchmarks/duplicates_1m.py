"""The near-duplicate job on a large synthetic collection: time, pairs, groups, recall of the planted
copies and peak memory.

    .venv/bin/python -m benchmarks.duplicates_1m [--n 1000000] [--dim 256] [--threshold 0.9] [--json]

The first run fills a SQLite database in ``--data-dir`` (default var/bench-duplicates-N-DIM) with N
image rows and their DIM-d codes, once: clustered rows (N/100 centres, two rows of one cluster at
cosine about 0.8, like two photos of one scene) and, among them, ``--originals`` rows with 1-3
planted near copies each (cosine 0.92-0.98 to their original). Every run then runs the service's
job code (app/duplicates/job.py: codes read from the database in chunks, pairs, groups, stored)
in a child process, so its peak RSS is the job's alone, and prints the time per stage, the pairs
and groups found, the share of planted copies grouped with their original, and the peak RSS; with
``--json`` a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COLLECTION = "dups"


def _background(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((max(16, n // 100), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        rows = centres[rng.integers(0, len(centres), size=m)]
        rows = rows + rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.5)
        out[start : start + m] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def synthetic(n: int, dim: int, *, originals: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit rows, the planted copies last, and (copies, 2) (original row, copy row)."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, size=originals)
    copies = int(per.sum())
    background = n - copies
    vectors = np.empty((n, dim), dtype=np.float32)
    vectors[:background] = _background(background, dim, rng)
    source = np.repeat(rng.choice(background, size=originals, replace=False), per)
    noise = rng.standard_normal((copies, dim)).astype(np.float32)
    noise -= (noise * vectors[source]).sum(1, keepdims=True) * vectors[source]  # orthogonal to it
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cosine = rng.uniform(0.92, 0.98, size=(copies, 1)).astype(np.float32)
    near = vectors[source] * cosine + noise * np.sqrt(1 - cosine**2)
    vectors[background:] = near / np.linalg.norm(near, axis=1, keepdims=True)
    return vectors, np.stack([source, np.arange(background, n)], axis=1)


def prepare(data_dir: Path, *, n: int, dim: int, originals: int) -> None:
    """Fill the database (unless a previous run did) and keep the planted truth beside it."""
    from sqlalchemy import func, select

    from app.catalog.collections import create_collection
    from app.context import open_context
    from app.core.settings import Settings
    from app.data.records import CollectionRecord, ImageRecord
    from tests.synthetic import insert_synthetic

    truth_path = data_dir / "planted.npy"
    ctx = open_context(Settings(data_dir=data_dir, default_embedder="tiny"))
    try:
        with ctx.db.session() as session:
            record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == COLLECTION))
            have = 0
            if record is not None:
                have = session.scalar(select(func.count()).where(ImageRecord.collection_id == record.id)) or 0
        if have == n and truth_path.is_file():
            return
        if have:
            raise SystemExit(f"{data_dir} holds {have} rows, not {n}: use another --data-dir")
        if record is None:
            create_collection(ctx, name=COLLECTION, embedder="tiny")
            with ctx.db.session() as session:
                record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == COLLECTION))
        assert record is not None and record.embedder_version is not None
        started = time.perf_counter()
        vectors, planted = synthetic(n, dim, originals=originals)
        ids = insert_synthetic(
            ctx.db,
            collection_id=record.id,
            vectors=vectors,
            embedder=record.embedder,
            embedder_version=record.embedder_version,
        )
        np.save(truth_path, ids[planted])
        print(f"inserted {n} rows of {dim}-d codes in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    finally:
        ctx.close()


def run_job(data_dir: Path, *, threshold: float) -> dict[str, object]:
    """The job, in this process: its summary, the recall of the planted copies and the peak RSS."""
    from sqlalchemy import select

    from app.context import open_context
    from app.core.settings import Settings
    from app.data.records import DuplicateMemberRecord
    from app.duplicates.job import find_duplicates

    ctx = open_context(Settings(data_dir=data_dir, default_embedder="tiny"))
    try:
        summary = find_duplicates(ctx, collection=COLLECTION, threshold=threshold)
        with ctx.db.session() as session:
            rows = session.execute(select(DuplicateMemberRecord.image_id, DuplicateMemberRecord.group_id))
            group_of = {int(image_id): int(group_id) for image_id, group_id in rows}
    finally:
        ctx.close()
    planted = np.load(data_dir / "planted.npy")
    together = sum(
        1
        for original, copy in planted.tolist()
        if group_of.get(original) is not None and group_of.get(original) == group_of.get(copy)
    )
    planted_members = set(planted.ravel().tolist())
    return {
        **summary,
        "planted_copies": len(planted),
        "copies_grouped_with_original": together,
        "recall": round(together / len(planted), 4),
        "images_grouped_outside_planted": sum(1 for i in group_of if i not in planted_members),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--originals", type=int, default=10_000, help="rows given planted copies")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: var/bench-duplicates-N-DIM")
    parser.add_argument("--json", dest="as_json", action="store_true")
    parser.add_argument("--job-only", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    data_dir = (args.data_dir or Path("var") / f"bench-duplicates-{args.n}-{args.dim}").resolve()
    if args.job_only:
        print(json.dumps(run_job(data_dir, threshold=args.threshold)))
        return
    prepare(data_dir, n=args.n, dim=args.dim, originals=args.originals)
    child = [sys.executable, "-m", "benchmarks.duplicates_1m", "--job-only", "--data-dir", str(data_dir)]
    child += ["--threshold", str(args.threshold)]
    done = subprocess.run(child, check=True, capture_output=True, text=True)
    result = {"n": args.n, "dim": args.dim, **json.loads(done.stdout.splitlines()[-1])}
    timings = result["timings_s"]
    print(
        f"{args.n} images of {args.dim}-d codes at cosine >= {args.threshold:g} ({result['method']}): "
        f"{result['seconds']:.1f} s (read {timings['read']:.1f}, pairs {timings['pairs']:.1f}, "
        f"store {timings['store']:.1f}); {result['pairs']} pairs, {result['groups']} groups, "
        f"{result['truncated_rows']} truncated rows; {result['copies_grouped_with_original']} of "
        f"{result['planted_copies']} planted copies grouped with their original; peak RSS "
        f"{result['peak_rss_mib']:.0f} MiB"
    )
    if args.as_json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
