"""``cbir worker``, and the check that separate roles (``cbir serve --role api`` + workers) run on
shared parts: PostgreSQL for state and jobs, a vector store every process reaches (docs/scaling.md)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import click

from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)


def shared_parts_problem(settings: Settings) -> str | None:
    """Why this configuration cannot run as separate API and worker processes, or None."""
    if not settings.sqlalchemy_url.startswith("postgresql"):
        return (
            "separate API and worker processes share their jobs and state through PostgreSQL: set "
            "CBIR_DATABASE_URL=postgresql+psycopg://... (SQLite runs everything in one `cbir serve`)"
        )
    if settings.vector_store_backend == "faiss":
        return (
            "separate API and worker processes need a vector store they all reach: set "
            "CBIR_VECTOR_STORE=milvus://HOST:PORT (in-process FAISS indexes live in one process)"
        )
    return None


@click.command()
@click.option(
    "--heartbeat",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="a file touched every few seconds while the worker lives (for a health check)",
)
def worker(heartbeat: Path | None) -> None:
    """Run jobs (imports, re-embeds, whitening, evaluations) claimed from the database until
    SIGTERM or Ctrl-C.

    Any number of workers may run beside any number of `cbir serve --role api` replicas. Each
    claims one queued job at a time and holds it with a lease (CBIR_JOB_LEASE_SECONDS); a job
    whose worker died is taken over by another at its high-water mark. On SIGTERM the running job
    stops after its current batch and is resumed by another worker."""
    from app.context import open_context
    from app.learning.job_kinds import job_runner

    settings = get_settings()
    problem = shared_parts_problem(settings)
    if problem is not None:
        raise click.ClickException(problem)
    if settings.read_only:
        raise click.ClickException("a worker writes: unset CBIR_READ_ONLY")
    if heartbeat is not None:
        try:
            heartbeat.touch()  # a path that cannot be written fails here, not in the poll loop
        except OSError as exc:
            raise click.ClickException(f"--heartbeat {heartbeat}: {exc.strerror or exc}") from None
    ctx = open_context(settings)
    runner = job_runner(ctx)

    def stop(*_: Any) -> None:
        runner.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        resumed = runner.recover()
        if resumed:
            log.warning("%d interrupted job(s) resumed", resumed)
        click.echo(f"cbir worker {runner.leases.owner} polling for jobs", err=True)
        runner.poll(heartbeat=heartbeat)
    finally:
        runner.shutdown()
        ctx.close()
