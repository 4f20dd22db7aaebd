"""The job runner as the service and the CLI use it: import jobs (app/ingest/jobs.py) plus what the
learning layer adds, the ``reembed`` job kind and the automatic tuning at the end of each import.

The ingest layer runs jobs and knows neither; this module hands them to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.context import AppContext
from app.ingest.jobs import JobRunner
from app.learning import autotune
from app.learning.reembed import run_reembed


def _reembed(
    ctx: AppContext,
    *,
    job_id: str,
    collection: str,
    params: dict[str, Any],
    should_stop: Callable[[], bool],
) -> bool:
    return run_reembed(
        ctx, job_id=job_id, collection=collection, spec=params["embedder"], should_stop=should_stop
    )


def job_runner(ctx: AppContext, *, runs_jobs: bool = True) -> JobRunner:
    """A JobRunner that also runs re-embedding jobs and tunes a collection after its imports;
    ``runs_jobs`` False: it only queues them for workers (an API replica)."""
    return JobRunner(
        ctx, kinds={"reembed": _reembed}, after_import=autotune.after_import_logged, runs_jobs=runs_jobs
    )
