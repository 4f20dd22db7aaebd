"""What the service counts: Prometheus instruments in a registry of their own, one per context.

Not prometheus-client's global registry: nothing is created at import time, and each application
context (a served app, a CLI command, a test's app) counts only its own work. ``GET /metrics``
renders ``Metrics.registry``; app/metrics/state.py adds what is read at scrape time.

Label values come from short fixed sets written in the code (stages, sources, results, reasons,
methods, route templates) or are collection names, which ``create_collection`` holds to
``[a-z0-9][a-z0-9_-]{0,63}`` and only a write key may create; never an id, a path, a file name, a
key's name or any other text a client sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

# Seconds: from a fraction of a millisecond (a stage of a search) to a minute (an upload of photos).
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The ASGI scope member where the layer that refuses a request names why (``note_refusal``); the
# request metrics' middleware counts it once the answer is sent.
REFUSAL = "cbir.refusal"
INGEST_RESULTS = frozenset({"added", "duplicate", "rejected"})


class HasStatus(Protocol):
    @property
    def status(self) -> str: ...


def note_refusal(scope: MutableMapping[str, Any], reason: str) -> None:
    """Say that this request is refused for ``reason`` (a fixed word: ``pending_embeds``,
    ``rate_limit``, ``decode_memory``): it shows in ``cbir_admission_refusals_total``."""
    scope[REFUSAL] = reason


class Metrics:
    """The instruments of one application context; their methods are what the hooks call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        labels = ["route", "method", "status"]
        self.requests = Counter(
            "cbir_http_requests",
            "HTTP requests answered, by route template (unmatched: no route), method and status",
            labels,
            registry=registry,
        )
        self.request_seconds = Histogram(
            "cbir_http_request_duration_seconds",
            "Seconds from a request's arrival to the end of its answer, by route template, method, status",
            labels,
            buckets=SECONDS,
            registry=registry,
        )
        self.refusals = Counter(
            "cbir_admission_refusals",
            "Requests refused to protect the service: pending_embeds (CBIR_MAX_PENDING_EMBEDS, 503), "
            "rate_limit (CBIR_RATE_LIMIT_PER_MINUTE, 429), decode_memory (the decode memory budget, 503)",
            ["reason"],
            registry=registry,
        )
        self.search_stage_seconds = Histogram(
            "cbir_search_stage_seconds",
            "Seconds per stage of a search, as its answer's timings_ms: decode, embed, stored, search, "
            "filter, expand, fetch, total; search=single (one query) or batch (a whole batch)",
            ["search", "stage"],
            buckets=SECONDS,
            registry=registry,
        )
        self.embed_batch = Histogram(
            "cbir_embed_batch_size",
            "Images per forward pass of an embedder, by source (query, upload, import)",
            ["source"],
            buckets=BATCH_SIZES,
            registry=registry,
        )
        self.embed_images = Counter(
            "cbir_embed_images",
            "Images embedded by forward passes, by source; rate() of it is images per second",
            ["source"],
            registry=registry,
        )
        self.embed_seconds = Counter(
            "cbir_embed_seconds",
            "Seconds spent in forward passes, by source (summed over an import's worker processes); "
            "images_total / seconds_total is the forward passes' own speed",
            ["source"],
            registry=registry,
        )
        self.ingested = Counter(
            "cbir_ingest_images",
            "Images through the write stage, by source (upload, import) and result (added, duplicate, "
            "rejected)",
            ["source", "result"],
            registry=registry,
        )
        self._per_request: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.index_rebuilds = Counter(
            "cbir_index_rebuilds",
            "Indexes (or vector-store spaces) built afresh from the database's vectors, by collection",
            ["collection"],
            registry=registry,
        )

    # -- the hooks -------------------------------------------------------------------------
    def request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._per_request.get(key)
        if children is None:  # .labels() takes a lock and builds a key each time: once per series
            code = str(status)
            children = (
                self.requests.labels(route, method, code),
                self.request_seconds.labels(route, method, code),
            )
            self._per_request[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def searched(self, search: str, timings_ms: Mapping[str, float]) -> None:
        """A search's laps (milliseconds, as its answer shows them)."""
        for stage, ms in timings_ms.items():
            self.search_stage_seconds.labels(search, stage).observe(ms / 1000)

    def embedded(self, source: str, *, images: int, seconds: float) -> None:
        """One forward pass of ``images`` images that took ``seconds``."""
        if images <= 0:
            return
        self.embed_batch.labels(source).observe(images)
        self.embed_images.labels(source).inc(images)
        self.embed_seconds.labels(source).inc(max(seconds, 0.0))

    def ingest_results(self, source: str, results: Iterable[HasStatus]) -> None:
        counts: dict[str, int] = {}
        for result in results:
            status = result.status if result.status in INGEST_RESULTS else "rejected"
            counts[status] = counts.get(status, 0) + 1
        for status, n in counts.items():
            self.ingested.labels(source, status).inc(n)

    def index_rebuilt(self, collection: str) -> None:
        self.index_rebuilds.labels(collection).inc()
