"""The FastAPI application: ``create_app(settings)`` builds it; nothing happens at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.api import (
    admission,
    headers,
    limits,
    openapi,
    pages,
    problems,
    routes_collections,
    routes_evaluation,
    routes_health,
    routes_images,
    routes_jobs,
    routes_keys,
    security,
)
from app.context import open_context
from app.memory import tune_malloc
from app.services.collections import list_collections
from app.services.evaluation import EvaluationRunner
from app.services.jobs import JobRunner
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    tune_malloc()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        context = open_context(settings)
        # Check every index against the database now, so the first query is fast and a stale
        # or torn index file is rebuilt before traffic arrives.
        for info in list_collections(context):
            log.info("collection %s: %d images, %d indexed", info.name, info.image_count, info.index_size)
        runner = JobRunner(context)
        # Read-only: interrupted jobs wait for a writable start to resume.
        interrupted = 0 if settings.read_only else runner.recover()
        if interrupted:
            log.warning("%d import job(s) were interrupted by the last shutdown", interrupted)
        app.state.context = context
        app.state.guard.open_keys(context.db)
        app.state.jobs = runner
        app.state.evaluations = EvaluationRunner(context)
        try:
            yield
        finally:
            runner.shutdown()
            app.state.evaluations.wait(timeout=30)
            context.close()

    app = FastAPI(
        title="cbir",
        version=__version__,
        description="Content-based image retrieval: upload an image, get the most similar images "
        "of a collection (CNN neural codes or denoising-autoencoder embeddings, FAISS search).",
        lifespan=lifespan,
        form_limits=limits.FORM_LIMITS,
    )
    problems.install(app)
    openapi.install(app)  # declares the problem+json error responses on every operation
    for module in (
        routes_collections,
        routes_images,
        routes_jobs,
        routes_evaluation,
        routes_health,
        routes_keys,
    ):
        app.include_router(module.router, prefix="/api/v1")
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Inside the access checks (added after it): a refused key never takes an upload's slot.
    app.add_middleware(admission.AdmissionMiddleware, limit=settings.pending_embeds_limit)
    # After the routes and the OpenAPI hook: it reads the route table and extends the document.
    app.state.guard = security.install(app, settings)
    # Outermost last: security headers (and CORS) also go on the body limits' 413 and 408.
    app.add_middleware(limits.BodyLimitMiddleware, settings=settings)
    headers.install(app, settings)
    return app
