from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import ContextDep, EvaluationsDep
from app.api.presenters import evaluation_out
from app.api.schemas import EvaluationOut, EvaluationStart
from app.services import evaluation

router = APIRouter(tags=["evaluation"])


def _out(ctx: ContextDep, runner: EvaluationsDep, name: str) -> EvaluationOut:
    return evaluation_out(
        runner.status(name),
        query_sets=evaluation.query_sets(),
        choices=evaluation.compare_choices(ctx, name),
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
    name: str, body: EvaluationStart, ctx: ContextDep, runner: EvaluationsDep
) -> EvaluationOut:
    """Evaluate in the background (tens of seconds for 10,000 queries on a CPU); poll the GET."""
    runner.start(collection=name, queries=body.queries, limit=body.limit, compare=tuple(body.compare))
    return _out(ctx, runner, name)
