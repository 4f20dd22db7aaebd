"""The job runner as the service and the CLI use it: import jobs (app/ingest/jobs.py) plus what the
learning layer adds, the ``reembed``, ``whiten`` and ``evaluate`` job kinds (and the
``duplicates`` runs of app/duplicates) and the automatic
tuning at the end of each import.

The ingest layer runs jobs and knows none of these; this module hands them to it. A whitening or
an evaluation that an API replica queued (app/learning/tasks.py) is rebuilt here from the job's
params (and, for an evaluation, the inputs kept beside its result) and run by the worker that
claimed it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from app.context import AppContext
from app.duplicates.job import find_duplicates
from app.embedding import cost
from app.ingest.jobs import JobRunner
from app.learning import autotune, tuning
from app.learning.evaluate_plan import EvaluationPlan, evaluation_result
from app.learning.reembed import run_reembed
from app.learning.tasks import read_inputs, run_claimed


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


def _whiten(
    ctx: AppContext,
    *,
    job_id: str,
    collection: str,
    params: dict[str, Any],
    should_stop: Callable[[], bool],
) -> bool:
    work = partial(
        tuning.whitening_job, ctx, collection=collection, dim=params["dim"], shrinkage=params["shrinkage"]
    )
    return run_claimed(ctx, job_id=job_id, work=work, should_stop=should_stop)


def _duplicates(
    ctx: AppContext,
    *,
    job_id: str,
    collection: str,
    params: dict[str, Any],
    should_stop: Callable[[], bool],
) -> bool:
    work = partial(find_duplicates, ctx, collection=collection, threshold=params["threshold"], job_id=job_id)
    return run_claimed(ctx, job_id=job_id, work=work, should_stop=should_stop)


def evaluation_inputs(plan: EvaluationPlan) -> dict[str, Any]:
    """What a worker needs to run ``plan`` as it was planned: ``describe()`` gives the ground
    truth by its size only and leaves out the QE weight."""
    return {
        "queries": plan.queries,
        "groundtruth": plan.groundtruth,
        "embedders": list(plan.embedders),
        "whiten": list(plan.whiten),
        "qe": list(plan.qe),
        "qe_alpha": plan.qe_alpha,
        "limit": plan.limit,
    }


def evaluation_plan(
    ctx: AppContext, *, collection: str, inputs: dict[str, Any], estimate_s: float
) -> EvaluationPlan:
    """The plan ``evaluation_inputs`` kept, as checked and estimated when it was accepted."""
    return EvaluationPlan(
        collection=collection,
        queries=inputs["queries"],
        groundtruth=inputs["groundtruth"],
        embedders=tuple(inputs["embedders"]),
        whiten=tuple(inputs["whiten"]),
        qe=tuple(inputs["qe"]),
        qe_alpha=inputs["qe_alpha"],
        limit=inputs["limit"],
        estimate=cost.Estimate(estimate_s, True, "as estimated when the job was accepted"),
        sync_budget=ctx.settings.sync_cost_budget_s,
        job_budget=ctx.settings.job_cost_budget_s,
    )


def _evaluate(
    ctx: AppContext,
    *,
    job_id: str,
    collection: str,
    params: dict[str, Any],
    should_stop: Callable[[], bool],
) -> bool:
    def work(*, token: Any) -> dict[str, Any]:
        plan = evaluation_plan(
            ctx, collection=collection, inputs=read_inputs(ctx, job_id), estimate_s=params["estimate_s"]
        )
        return evaluation_result(ctx, plan=plan, token=token)

    return run_claimed(ctx, job_id=job_id, work=work, should_stop=should_stop)


def job_runner(ctx: AppContext, *, runs_jobs: bool = True) -> JobRunner:
    """A JobRunner that also runs re-embedding, whitening and evaluation jobs and tunes a
    collection after its imports; ``runs_jobs`` False: it only queues them for workers (an API
    replica)."""
    return JobRunner(
        ctx,
        kinds={"reembed": _reembed, "whiten": _whiten, "evaluate": _evaluate, "duplicates": _duplicates},
        after_import=autotune.after_import_logged,
        runs_jobs=runs_jobs,
    )
