"""The FastAPI application: ``create_app(settings)`` builds it; nothing happens at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.api import (
    admission,
    failsafe,
    headers,
    limits,
    openapi,
    parameters,
    problems,
    routes_collections,
    routes_duplicates,
    routes_evaluation,
    routes_health,
    routes_images,
    routes_jobs,
    routes_keys,
    security,
)
from app.catalog.collections import list_collections
from app.catalog.metadata_repair import repair_on_start
from app.context import open_context
from app.core.memory import tune_malloc
from app.core.settings import Settings, get_settings
from app.learning.evaluation_runs import EvaluationRunner
from app.learning.job_kinds import job_runner
from app.learning.tasks import TaskRunner
from app.web import pages

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "web" / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    tune_malloc()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        context = open_context(settings)
        repair_on_start(context.db)  # metadata an older version stored with NaN or lone surrogates
        # Check every index against the database now, so the first query is fast and a stale
        # or torn index file is rebuilt before traffic arrives.
        for info in list_collections(context):
            log.info("collection %s: %d images, %d indexed", info.name, info.image_count, info.index_size)
        # Role "api": jobs are queued for `cbir worker` processes. Read-only: interrupted jobs
        # wait for a writable start to resume.
        runs_jobs = settings.role == "all" and not settings.read_only
        # Evaluations and whitening run here in role "all" (read-only too), on workers in role
        # "api". Their recovery first: it fails those of processes that are gone, which are not
        # resumed, before the job runner's recovery takes over the rest.
        tasks = TaskRunner(context, runs_jobs=settings.role == "all")
        if not settings.read_only and tasks.recover():
            log.warning("evaluate or whiten jobs were interrupted by the last shutdown: start them again")
        runner = job_runner(context, runs_jobs=runs_jobs)
        interrupted = runner.recover() if runs_jobs else 0
        if interrupted:
            log.warning("%d import job(s) were interrupted by the last shutdown", interrupted)
        if runs_jobs and context.db.shared:
            runner.start_polling()  # jobs queued by API replicas, or left by workers that died
        app.state.context = context
        app.state.guard.open_keys(context.db)
        app.state.jobs = runner
        app.state.evaluations = EvaluationRunner(context)
        app.state.tasks = tasks
        try:
            yield
        finally:
            # Costly work checks its token between batches: a few seconds at most, never minutes.
            tasks.shutdown(timeout=10)
            app.state.evaluations.shutdown(timeout=10)
            runner.shutdown()
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
        routes_duplicates,
        routes_images,
        routes_jobs,
        routes_evaluation,
        routes_health,
        routes_keys,
    ):
        # A scalar parameter or form part given twice is refused by the API, never silently one of
        # them; pages stay lenient (app/web/pages.py).
        app.include_router(
            module.router, prefix="/api/v1", dependencies=[Depends(parameters.reject_repeated_parameters)]
        )
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Inside the access checks (added after it): a refused key never takes an upload's slot.
    app.add_middleware(admission.AdmissionMiddleware, limit=settings.pending_embeds_limit)
    # After the routes and the OpenAPI hook: it reads the route table and extends the document.
    app.state.guard = security.install(app, settings)
    # Outermost last: security headers (and CORS) also go on the body limits' 413 and 408.
    app.add_middleware(limits.BodyLimitMiddleware, settings=settings)
    # Inside the security headers, outside the rest: an unexpected error is a 500 with those
    # headers on a connection that stays open for keep-alive.
    app.add_middleware(failsafe.UnexpectedErrorMiddleware)
    headers.install(app, settings)
    return app
