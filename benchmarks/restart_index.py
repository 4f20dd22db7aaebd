"""Seconds from a cold start to the first answered query, for a collection of N synthetic images.

    .venv/bin/python -m benchmarks.restart_index --n 1000000 [--data-dir DIR] [--factory auto]

The first run fills a SQLite database in ``--data-dir`` with N image rows and their 128-d vectors
(noisy copies of clustered centres; no image files) and builds the index (auto: HNSW32 above
100,000), once; every run then starts the service as a restart would (``create_app`` and its
lifespan: migrations, the index file loaded and checked against the database's ids) and asks for
one ``similar`` query over HTTP (``TestClient``). It prints the seconds to that first answer and,
as its last line, ``{"n": ..., "startup_s": ..., "first_query_s": ..., "total_s": ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np


def _vectors(n: int, dim: int, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 100), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        rows = centres[rng.integers(0, len(centres), size=m)]
        rows = rows + rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.5)
        out[start : start + m] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def prepare(data_dir: Path, *, n: int, factory: str, say=print) -> None:  # type: ignore[no-untyped-def]
    """Fill the database and build the index, unless a previous run did."""
    from sqlalchemy import func, select

    from app.catalog.collections import create_collection
    from app.context import open_context
    from app.core.settings import Settings
    from app.data.records import CollectionRecord, ImageRecord
    from tests.synthetic import insert_synthetic

    settings = Settings(data_dir=data_dir, default_embedder="tiny")
    ctx = open_context(settings)
    try:
        with ctx.db.session() as session:
            record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == "scale"))
            have = (
                session.scalar(select(func.count()).where(ImageRecord.collection_id == record.id))
                if record
                else 0
            )
        if record is None:
            create_collection(ctx, name="scale", embedder="tiny")
            with ctx.db.transaction() as session:
                record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == "scale"))
                assert record is not None
                record.index_factory = factory
        if have != n:
            if have:
                raise SystemExit(f"{data_dir} holds {have} rows, not {n}: use another --data-dir")
            with ctx.db.session() as session:
                record = session.scalar(select(CollectionRecord).where(CollectionRecord.name == "scale"))
            assert record is not None and record.embedder_version is not None
            started = time.perf_counter()
            vectors = _vectors(n, 64, seed=0)  # tiny's 64-d
            insert_synthetic(
                ctx.db,
                collection_id=record.id,
                vectors=vectors,
                embedder=record.embedder,
                embedder_version=record.embedder_version,
            )
            say(f"inserted {n} rows in {time.perf_counter() - started:.1f} s")
            started = time.perf_counter()
            ctx.indexes.build(record)
            say(f"built the index in {time.perf_counter() - started:.1f} s")
    finally:
        ctx.close()


def restart(data_dir: Path) -> dict[str, float]:
    """One cold start and first query; the timings in seconds."""
    from fastapi.testclient import TestClient

    from app.core.settings import Settings
    from app.main import create_app

    started = time.perf_counter()
    app = create_app(Settings(data_dir=data_dir, default_embedder="tiny"))
    with TestClient(app) as client:
        up = time.perf_counter()
        first = client.get("/api/v1/collections/scale/images?limit=1").json()[0]["id"]
        response = client.get(f"/api/v1/collections/scale/images/{first}/similar", params={"k": 10})
        done = time.perf_counter()
        assert response.status_code == 200, response.text
        assert len(response.json()["hits"]) == 10
        index = client.get("/api/v1/collections/scale/index").json()
    return {
        "startup_s": round(up - started, 3),
        "first_query_s": round(done - up, 3),
        "total_s": round(done - started, 3),
        "kind": index["kind"],
        "ntotal": index["ntotal"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: var/bench-restart-N")
    parser.add_argument("--factory", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data_dir = (args.data_dir or Path("var") / f"bench-restart-{args.n}").resolve()
    prepare(data_dir, n=args.n, factory=args.factory)
    result = restart(data_dir)
    print(
        f"{args.n} images ({result['kind']}): service up in {result['startup_s']} s, first query after "
        f"{result['first_query_s']} s more: {result['total_s']} s from start to first answer"
    )
    print(json.dumps({"n": args.n, **result}))


if __name__ == "__main__":
    main()
