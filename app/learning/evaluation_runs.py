"""Evaluations as background runs: one run per request at a time, its result kept on disk,
stopped at shutdown."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from app.catalog.collections import require_collection
from app.context import AppContext
from app.core.cancel import CancelToken
from app.core.errors import Cancelled, InvalidRequest
from app.data.records import utcnow
from app.data.storage import write_atomic
from app.learning.evaluate_plan import plan_evaluation
from app.learning.evaluation import evaluate, query_sets
from app.search.against import resolve_compare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationRequest:
    collection: str
    queries: str
    limit: int | None
    compare: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"queries": self.queries, "limit": self.limit, "compare": list(self.compare)}


@dataclass(frozen=True)
class EvaluationStatus:
    collection: str
    embedder_version: str | None
    running: list[dict[str, Any]]  # requests in progress, with started_at
    latest: dict[str, Any] | None  # the newest cached result for the served embedder version
    failure: dict[str, Any] | None  # the last failed run of this collection, if newer than latest


class EvaluationRunner:
    """Runs evaluations on a background thread and caches each result as JSON in the data folder,
    keyed by (collection, embedder version, query set, limit, compared embedders)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._running: dict[EvaluationRequest, datetime] = {}
        self._failures: dict[str, dict[str, Any]] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = CancelToken()  # set at shutdown: every run stops at its next check
        self._tokens: dict[EvaluationRequest, CancelToken] = {}
        # The scope of the key that started each run (app/api/job_access.py): stopping it needs it.
        self._creators: dict[EvaluationRequest, str] = {}

    def folder(self, collection: str) -> Path:
        return self.ctx.settings.data_dir / "evaluations" / collection

    def start(
        self,
        *,
        collection: str,
        queries: str,
        limit: int | None,
        compare: tuple[str, ...],
        creator: str = "anonymous",
    ) -> EvaluationRequest:
        """Check the request now (404/422 at once; 422 over_budget when estimated over
        CBIR_JOB_COST_BUDGET_S), then evaluate in the background; a request already running is
        not started twice."""
        if queries not in query_sets():
            raise InvalidRequest(f"unknown query set {queries[:40]!r}; known: {', '.join(query_sets())}")
        if limit is not None and limit < 1:
            raise InvalidRequest(f"limit must be at least 1, got {limit}")
        with self.ctx.db.session() as session:
            record = require_collection(session, collection)
            for spec in compare:
                resolve_compare(self.ctx, session=session, collection=record, spec=spec)
        request = EvaluationRequest(collection, queries, limit, tuple(dict.fromkeys(compare)))
        plan_evaluation(
            self.ctx, collection=collection, queries=queries, embedders=request.compare, limit=limit
        ).require(job=True)
        with self._lock:
            if request in self._running:
                return request
            self._running[request] = utcnow()
            self._tokens[request] = CancelToken(parent=self._stopping)
            self._creators[request] = creator
            thread = threading.Thread(
                target=self._run, args=(request,), name=f"cbir-eval-{collection}", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return request

    def creators(self, collection: str) -> set[str]:
        """The scopes of the keys that started the collection's runs in progress."""
        with self._lock:
            return {self._creators[r] for r in self._tokens if r.collection == collection}

    def cancel(self, collection: str) -> int:
        """Stop the collection's runs in progress (at their next check); how many were asked to."""
        with self._lock:
            tokens = [token for request, token in self._tokens.items() if request.collection == collection]
        for token in tokens:
            token.cancel("cancelled by a request")
        return len(tokens)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every run at its next check (within about a second) and wait for them."""
        self._stopping.cancel("the service is shutting down")
        self.wait(timeout)

    def wait(self, timeout: float = 300.0) -> None:
        """Wait for running evaluations to end (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, request: EvaluationRequest) -> None:
        started = time.perf_counter()
        try:
            with self.ctx.db.session() as session:
                record = require_collection(session, request.collection)
            version = record.embedder_version
            with self._lock:
                token = self._tokens[request]
            rows = evaluate(
                self.ctx,
                collection=request.collection,
                queries=request.queries,
                compare=request.compare,
                limit=request.limit,
                token=token,
            )
            result = {
                "collection": request.collection,
                # A collection deleted and created again under the same name starts afresh.
                "collection_created_at": record.created_at.isoformat(),
                "embedder_version": version,
                **request.describe(),
                "computed_at": utcnow().isoformat(),
                "seconds": round(time.perf_counter() - started, 1),
                "results": rows,
            }
            path = self.folder(request.collection) / f"{_cache_key(request, version)}.json"
            write_atomic(path, json.dumps(result, allow_nan=False).encode("utf-8"), fsync=False)
            with self._lock:
                self._failures.pop(request.collection, None)
        except Exception as exc:  # reported on the page; never kills the service
            if isinstance(exc, InvalidRequest | Cancelled):
                detail = exc.detail
            else:
                log.exception("evaluation of %s failed", request.collection)
                detail = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._failures[request.collection] = {
                    **request.describe(),
                    "failed_at": utcnow().isoformat(),
                    "error": detail,
                }
        finally:
            with self._lock:
                self._running.pop(request, None)
                self._tokens.pop(request, None)
                self._creators.pop(request, None)

    def status(self, collection: str) -> EvaluationStatus:
        with self.ctx.db.session() as session:
            record = require_collection(session, collection)
        version = record.embedder_version
        with self._lock:
            running = [
                {**r.describe(), "started_at": at.isoformat()}
                for r, at in self._running.items()
                if r.collection == collection
            ]
            failure = self._failures.get(collection)
        latest = None
        for path in (
            sorted(self.folder(collection).glob("*.json")) if self.folder(collection).is_dir() else []
        ):
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a cache file that cannot be read is simply not shown
            if (
                cached.get("embedder_version") != version
                or cached.get("collection_created_at") != record.created_at.isoformat()
            ):
                continue
            if latest is None or cached.get("computed_at", "") > latest.get("computed_at", ""):
                latest = cached
        if failure and latest and failure["failed_at"] < latest["computed_at"]:
            failure = None
        return EvaluationStatus(
            collection=collection, embedder_version=version, running=running, latest=latest, failure=failure
        )


def _cache_key(request: EvaluationRequest, version: str | None) -> str:
    raw = json.dumps([request.collection, version, request.queries, request.limit, sorted(request.compare)])
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:24]
