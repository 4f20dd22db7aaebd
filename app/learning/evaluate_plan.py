"""What an evaluation will do and what it costs, settled before any of it is done.

Repeated embedders, whitening dims and QE depths count once, and at most ``MAX_EMBEDDERS``
distinct embedders are evaluated at a time. The estimate (app/embedding/cost.py) decides: within
CBIR_SYNC_COST_BUDGET_S the answer comes now, within CBIR_JOB_COST_BUDGET_S it runs as a job,
beyond that it is refused (422 over_budget) with what would make it cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from app.catalog.collections import checkpoint_of, require_collection
from app.catalog.filters import label_counts
from app.context import AppContext
from app.core.cancel import NEVER, CancelToken
from app.core.errors import InvalidRequest
from app.embedding import cost
from app.embedding.embedders import validate_embedder_name
from app.ingest.sources.holidays import check_groundtruth
from app.learning import evaluation
from app.learning import groundtruth as gt
from app.learning.training import collection_size
from app.search.against import resolve_compare
from models import registry

MAX_EMBEDDERS = 4


@dataclass(frozen=True)
class EvaluationPlan:
    collection: str
    queries: str | None  # a labelled query set, or
    groundtruth: dict[str, list[str]] | None  # {query file: [relevant files]}
    embedders: tuple[str, ...]
    whiten: tuple[int, ...]
    qe: tuple[int, ...]
    qe_alpha: float | None
    limit: int | None
    estimate: cost.Estimate
    sync_budget: float
    job_budget: float

    @property
    def now(self) -> bool:
        """Cheap enough to answer in the request."""
        return self.estimate.seconds <= self.sync_budget

    def require(self, *, job: bool) -> None:
        """OverBudget unless the plan fits the job budget (``job``) or the synchronous one."""
        budget, setting = (self.job_budget, cost.JOB) if job else (self.sync_budget, cost.SYNC)
        if self.estimate.seconds <= budget:
            return
        cheaper = (
            "evaluate fewer embedders, whitening dims or QE depths"
            if self.groundtruth is not None
            else 'evaluate fewer embedders, or fewer queries ("limit")'
        )
        raise cost.over("this evaluation", self.estimate, budget=budget, setting=setting, cheaper=cheaper)

    def describe(self) -> dict[str, Any]:
        """The plan as a job's params (the ground truth by its size: it may be large)."""
        return {
            "queries": self.queries,
            "groundtruth": None if self.groundtruth is None else len(self.groundtruth),
            "embedders": list(self.embedders),
            "whiten": list(self.whiten),
            "qe": list(self.qe),
            "limit": self.limit,
            "estimate_s": round(self.estimate.seconds, 1),
        }


def distinct_embedders(specs: Sequence[str]) -> tuple[str, ...]:
    """The specs in their first order, each once; InvalidRequest for more than MAX_EMBEDDERS."""
    unique = tuple(dict.fromkeys(specs))
    if len(unique) > MAX_EMBEDDERS:
        raise InvalidRequest(
            f"evaluate at most {MAX_EMBEDDERS} distinct embedders at a time, got {len(unique)}"
        )
    return unique


def plan_evaluation(
    ctx: AppContext,
    *,
    collection: str,
    queries: str | None = None,
    groundtruth: dict[str, list[str]] | None = None,
    embedders: Sequence[str] = (),
    whiten: Sequence[int] = (),
    qe: Sequence[int] = (),
    qe_alpha: float | None = None,
    limit: int | None = None,
) -> EvaluationPlan:
    """Check the request (404/422 before any work) and estimate it."""
    if (queries is None) == (groundtruth is None):
        raise InvalidRequest("give either queries (a labelled query set) or groundtruth, not both")
    specs = distinct_embedders(embedders)
    # no dims (and no embedders): the collection as served, whitened if it serves a whitening
    dims, depths = tuple(dict.fromkeys(whiten)), tuple(dict.fromkeys(qe))
    settings = ctx.settings
    if groundtruth is not None:
        truth = check_groundtruth(groundtruth)
        build = partial(
            _groundtruth_cost, ctx, collection=collection, truth=truth, specs=specs, dims=dims, depths=depths
        )
    else:
        assert queries is not None
        if any(dims) or any(depths):
            raise InvalidRequest("whiten and qe are evaluated with a groundtruth")
        if queries not in evaluation.QUERY_SET_SIZES:
            known = ", ".join(evaluation.query_sets())
            raise InvalidRequest(f"unknown query set {queries[:40]!r}; known: {known}")
        truth = None
        check_labels(ctx, collection=collection, queries=queries)
        build = partial(_labelled_cost, ctx, collection=collection, queries=queries, specs=specs, limit=limit)
    found = cost.estimate(build, budget=min(settings.sync_cost_budget_s, settings.job_cost_budget_s))
    return EvaluationPlan(
        collection=collection,
        queries=queries,
        groundtruth=truth,
        embedders=specs,
        whiten=dims,
        qe=depths,
        qe_alpha=qe_alpha,
        limit=limit,
        estimate=found,
        sync_budget=settings.sync_cost_budget_s,
        job_budget=settings.job_cost_budget_s,
    )


def run_evaluation(
    ctx: AppContext, *, plan: EvaluationPlan, token: CancelToken = NEVER
) -> list[dict[str, Any]]:
    """The result rows, as ``cbir eval`` gives them; Cancelled once ``token`` is set."""
    if plan.groundtruth is not None:
        return gt.evaluate_with_groundtruth(
            ctx,
            collection=plan.collection,
            groundtruth=plan.groundtruth,
            embedders=plan.embedders,
            whiten=plan.whiten or None,
            qe=plan.qe,
            qe_alpha=plan.qe_alpha,
            token=token,
        )
    assert plan.queries is not None
    return evaluation.evaluate(
        ctx,
        collection=plan.collection,
        queries=plan.queries,
        compare=plan.embedders,
        limit=plan.limit,
        token=token,
    )


def evaluation_result(ctx: AppContext, *, plan: EvaluationPlan, token: CancelToken) -> dict[str, Any]:
    """What a job keeps as its result: the answer ``POST /evaluate`` gives when it runs at once."""
    return {"collection": plan.collection, "results": run_evaluation(ctx, plan=plan, token=token)}


def check_labels(ctx: AppContext, *, collection: str, queries: str) -> None:
    """InvalidRequest unless every image of the collection has a label and some label is one the
    queries carry: what the evaluation would find out only after its costliest part (one GROUP
    BY over the metadata)."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        counts = label_counts(session, collection_id=record.id)
    unlabelled = sum(count for label, count in counts if label is None or not label.strip())
    if unlabelled:
        some = "image has" if unlabelled == 1 else "images have"
        raise InvalidRequest(
            f"{unlabelled:,} {some} no 'label' in the metadata of collection {collection!r}: every "
            f"image of the collection needs a 'label' to be evaluated against {queries} (same label "
            "= relevant); label them or delete them, or evaluate with a groundtruth"
        )
    known = evaluation.QUERY_SET_LABELS[queries]
    if counts and not any(label in known for label, _ in counts):
        shown = ", ".join(sorted(known)[:10])
        raise InvalidRequest(
            f"none of the labels of {queries} ({shown}) occur in this collection, so every result "
            "would count as wrong; evaluate with queries labelled like the collection"
        )


# -- estimates ------------------------------------------------------------------------------------
def _labelled_cost(
    ctx: AppContext,
    measure: bool,
    *,
    collection: str,
    queries: str,
    specs: tuple[str, ...],
    limit: int | None,
) -> cost.Estimate:
    """Per embedder: embed the queries, read (own) or embed (others) the collection, rank all pairs."""
    size = evaluation.QUERY_SET_SIZES[queries]
    count = min(limit or size, size)
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
        sides = [
            (resolve_compare(ctx, session=session, collection=record, spec=spec)[1], False) for spec in specs
        ]
    if record.embedder_version is not None:
        sides.insert(0, (ctx.embedders.for_collection(record, checkpoint), True))
    images = collection_size(ctx, record.id)
    total = cost.NOTHING
    for embedder, stored in sides:
        forward, measured = cost.forward_seconds(ctx, embedder=embedder, measure=measure)
        total += cost.Estimate(count * forward, measured, f"{count:,} queries with {embedder.version}")
        if stored:
            total += cost.plain(images * cost.ROW_READ_S)
        else:
            total += cost.embedding(
                ctx, embedder=embedder, collection_id=record.id, images=images, measure=measure
            )
        total += cost.plain(count * images * cost.PAIR_S, f"{count:,} x {images:,} pairs ranked")
    return total


def _groundtruth_cost(
    ctx: AppContext,
    measure: bool,
    *,
    collection: str,
    truth: dict[str, list[str]],
    specs: tuple[str, ...],
    dims: tuple[int, ...],
    depths: tuple[int, ...],
) -> cost.Estimate:
    """Per embedder: read or embed the collection; per whitening dim a fit; per QE depth a ranking."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        checkpoint = checkpoint_of(session, record)
    whitened = checkpoint is not None and (checkpoint.config or {}).get("kind") == "whitening"
    images = collection_size(ctx, record.id)
    count = min(len(truth), images)
    total = cost.NOTHING
    as_served = not dims and not specs
    for spec in [validate_embedder_name(s) for s in specs] or [record.embedder]:
        stored = spec == record.embedder and record.embedder_version is not None
        if stored and (as_served or not whitened):
            dim = ctx.embedders.for_collection(record, checkpoint).dim
            total += cost.plain(images * cost.ROW_READ_S)
        else:
            if registry.get_spec(spec).trainable:
                raise InvalidRequest(
                    f"{spec!r} is trained per collection; evaluate its checkpoint on the collection "
                    "that serves it"
                )
            embedder = ctx.embedders.get(spec)
            dim = embedder.dim
            total += cost.embedding(
                ctx, embedder=embedder, collection_id=record.id, images=images, measure=measure
            )
        for whiten in dims or (0,):
            if whiten:
                total += cost.plain((images * dim * dim + 4 * dim**3) * cost.FLOP_S)
            for depth in depths or (0,):
                rounds = 2 if depth else 1  # QE ranks again with the expanded queries
                total += cost.plain(rounds * count * images * (cost.PAIR_S + dim * cost.FLOP_S))
    return total
