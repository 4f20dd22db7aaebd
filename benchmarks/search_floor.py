"""Where the time of one ``POST /collections/{name}/search`` goes inside the service, without a network.

Builds the application of the current settings (``CBIR_DATA_DIR``: a data folder holding the
collection, e.g. the MNIST demo), runs its lifespan, and sends it ASGI requests directly: one query
image (the collection's first stored file) per request, ``k=10``, one request at a time. For each
it notes when the request enters the app, reaches the router, hands the search to the thread pool
and gets it back, and when the answer has been sent; it prints the medians in milliseconds:

- ``middlewares``: app entry to the router (the ASGI middlewares: error handlers, body limits,
  security headers, access control, admission);
- ``before``: app entry to the thread-pool hop (the middlewares, route matching, multipart parsing,
  the dependencies, reading the upload);
- ``hop``: the thread-pool hop less the search's own ``timings_ms.total``;
- ``server``: ``timings_ms.total`` (decode, embed, search, fetch);
- ``after``: from the search's return to the last byte sent (the hits' presentation, the response
  model, JSON, the middlewares on the way out);
- ``overhead``: all but ``server``.

What a live server adds on top (uvicorn, the loopback socket, the client) is the difference with
``cbir bench search --http``'s ``client_p50_ms``.

    CBIR_DATA_DIR=... python benchmarks/search_floor.py [--collection mnist] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

import app.api.routes_images as routes_images  # noqa: E402
from app.catalog import images  # noqa: E402
from app.core.settings import get_settings  # noqa: E402
from app.data.records import CollectionRecord, ImageRecord  # noqa: E402
from app.main import create_app  # noqa: E402

WARMUP = 50
_marks: contextvars.ContextVar[dict[str, float]] = contextvars.ContextVar("marks")
_hop = routes_images.run_in_threadpool


async def _timed_hop(func: Any, *args: Any, **kwargs: Any) -> Any:
    marks = _marks.get()
    marks["hop_in"] = time.perf_counter()
    result = await _hop(func, *args, **kwargs)
    marks["hop_out"] = time.perf_counter()
    return result


def _body(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n\r\n'
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), boundary


async def _one(app: Any, *, collection: str, body: bytes, boundary: str) -> dict[str, float]:
    path = f"/api/v1/collections/{collection}/search"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"k=10",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    marks = {"start": time.perf_counter()}
    _marks.set(marks)
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)  # no disconnect while the answer is written
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    marks["end"] = time.perf_counter()
    if sent[0]["status"] != 200:
        raise SystemExit(f"the search answered {sent[0]['status']}: {sent[1:]}")
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    marks["server"] = answer["timings_ms"]["total"]
    return marks


async def _run(*, collection: str, requests: int) -> dict[str, float]:
    routes_images.run_in_threadpool = _timed_hop  # type: ignore[assignment]
    app = create_app(get_settings())
    router_call = type(app.router).__call__

    async def timed_router(self: Any, scope: Any, receive: Any, send: Any) -> None:
        _marks.get().setdefault("router", time.perf_counter())
        await router_call(self, scope, receive, send)

    type(app.router).__call__ = timed_router  # type: ignore[method-assign]
    async with app.router.lifespan_context(app):
        context = app.state.context
        with context.db.session() as session:
            first = session.scalar(
                select(ImageRecord.id)
                .join(CollectionRecord, CollectionRecord.id == ImageRecord.collection_id)
                .where(CollectionRecord.name == collection)
                .order_by(ImageRecord.id)
                .limit(1)
            )
        if first is None:
            raise SystemExit(f"no images in collection {collection!r}")
        path, _ = images.image_file(context, first)
        body, boundary = _body(Path(path).read_bytes())
        rows = []
        for i in range(WARMUP + requests):
            marks = await _one(app, collection=collection, body=body, boundary=boundary)
            if i >= WARMUP:
                rows.append(marks)

    def median(part: Any) -> float:
        return round(statistics.median(part(r) for r in rows), 3)

    return {
        "middlewares": median(lambda r: (r["router"] - r["start"]) * 1e3),
        "before": median(lambda r: (r["hop_in"] - r["start"]) * 1e3),
        "hop": median(lambda r: (r["hop_out"] - r["hop_in"]) * 1e3 - r["server"]),
        "server": median(lambda r: r["server"]),
        "after": median(lambda r: (r["end"] - r["hop_out"]) * 1e3),
        "overhead": median(lambda r: (r["end"] - r["start"]) * 1e3 - r["server"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--collection", default="mnist")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_run(collection=args.collection, requests=args.requests))))


if __name__ == "__main__":
    main()
