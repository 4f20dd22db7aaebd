from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api import job_access
from app.api.deps import ContextDep, EvaluationsDep, TasksDep
from app.api.disconnect import run_cancellable
from app.api.evaluation_schemas import EvaluateIn, EvaluateOut, EvaluateRow, EvaluationOut, EvaluationStart
from app.api.presenters import evaluation_out
from app.api.schemas import JobAccepted
from app.learning import evaluation
from app.learning.evaluate_plan import evaluation_result, plan_evaluation, run_evaluation
from app.learning.job_kinds import evaluation_inputs
from app.search import against

router = APIRouter(tags=["evaluation"])
API = "/api/v1"


def _out(ctx: ContextDep, runner: EvaluationsDep, name: str) -> EvaluationOut:
    return evaluation_out(
        runner.status(name),
        query_sets=evaluation.query_sets(),
        choices=against.compare_choices(ctx, name),
    )


@router.get("/collections/{name}/evaluation", response_model=EvaluationOut)
def get_evaluation(name: str, ctx: ContextDep, runner: EvaluationsDep) -> EvaluationOut:
    """The newest cached evaluation of the collection's served embedder (P@10, mAP, precision-
    recall curve; same label = relevant), the runs in progress and what it can be compared with."""
    return _out(ctx, runner, name)


@router.post(
    "/collections/{name}/evaluation", status_code=status.HTTP_202_ACCEPTED, response_model=EvaluationOut
)
def start_evaluation(
    name: str, body: EvaluationStart, request: Request, ctx: ContextDep, runner: EvaluationsDep
) -> EvaluationOut:
    """Evaluate in the background (tens of seconds for 10,000 queries on a CPU); poll the GET.
    422 ``over_budget`` when estimated over CBIR_JOB_COST_BUDGET_S."""
    runner.start(
        collection=name,
        queries=body.queries,
        limit=body.limit,
        compare=tuple(body.compare),
        creator=job_access.creator(request),
    )
    return _out(ctx, runner, name)


@router.delete("/collections/{name}/evaluation", response_model=EvaluationOut)
def stop_evaluation(name: str, request: Request, ctx: ContextDep, runner: EvaluationsDep) -> EvaluationOut:
    """Stop the collection's background evaluations in progress (within about a second); the
    cached results stay. Needs the scope of the keys that started them."""
    for creator in runner.creators(name):
        job_access.require_creator(request, creator, what=f"stopping the evaluations of {name!r}")
    runner.cancel(name)
    return _out(ctx, runner, name)


@router.post(
    "/collections/{name}/evaluate",
    response_model=EvaluateOut,
    responses={202: {"model": JobAccepted, "description": "over CBIR_SYNC_COST_BUDGET_S: a job"}},
)
async def evaluate(
    name: str, body: EvaluateIn, request: Request, ctx: ContextDep, tasks: TasksDep
) -> EvaluateOut | JSONResponse:
    """P@10, mAP@10 and mAP over the full ranking per embedder (and whitening / QE setting): with
    ``groundtruth`` Holidays-style, or against a labelled ``queries`` set. Repeated embedders count
    once, at most 4. Estimated within CBIR_SYNC_COST_BUDGET_S: answered now (stopped if the client
    leaves); else a job (202; its result at ``result_url``); over CBIR_JOB_COST_BUDGET_S: 422
    ``over_budget``."""
    plan = await run_in_threadpool(
        partial(
            plan_evaluation,
            ctx,
            collection=name,
            queries=body.queries,
            groundtruth=body.groundtruth,
            embedders=body.embedders,
            whiten=body.whiten,
            qe=body.qe,
            qe_alpha=body.qe_alpha,
            limit=body.limit,
        )
    )
    if plan.now:
        rows = await run_cancellable(request, run_evaluation, ctx=ctx, plan=plan)
        return EvaluateOut(collection=name, results=[EvaluateRow.model_validate(row) for row in rows])
    plan.require(job=True)
    job_id = tasks.submit(
        kind="evaluate",
        collection=name,
        params=plan.describe(),
        work=partial(evaluation_result, ctx, plan=plan),
        creator=job_access.creator(request),
        inputs=evaluation_inputs(plan),
    )
    accepted = JobAccepted(
        job_id=job_id,
        state="queued",
        status_url=f"{API}/jobs/{job_id}",
        result_url=f"{API}/collections/{name}/evaluate/{job_id}",
    )
    return JSONResponse(accepted.model_dump(), status_code=status.HTTP_202_ACCEPTED)


@router.get("/collections/{name}/evaluate/{job_id}", response_model=EvaluateOut)
def evaluate_result(name: str, job_id: str, tasks: TasksDep) -> EvaluateOut:
    """The result of an evaluate job once it has succeeded (409 ``job_not_finished`` before)."""
    return EvaluateOut.model_validate(tasks.result(job_id, kind="evaluate", collection=name))
