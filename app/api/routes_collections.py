from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import JSONResponse

from app.api import job_access, security
from app.api.deps import MAX_ID, ContextDep, FilterDep, JobsDep, TasksDep
from app.api.presenters import collection_out, image_out, map_out
from app.api.schemas import (
    CollectionCreate,
    CollectionList,
    CollectionOut,
    EmbedderChange,
    ImageOut,
    IndexConfigIn,
    IndexOut,
    IndexProblemOut,
    JobAccepted,
    LabelCount,
    LabelList,
    MapOut,
    SearchOptionsIn,
    TuningIn,
    WhiteningIn,
)
from app.catalog import collections, index_admin
from app.indexing.manager import IndexStatus
from app.learning import autotune, tuning
from app.learning.reembed import check_reembed
from app.search import maps

router = APIRouter(tags=["collections"])


@router.post("/collections", status_code=status.HTTP_201_CREATED, response_model=CollectionOut)
def create_collection(body: CollectionCreate, ctx: ContextDep) -> CollectionOut:
    return collection_out(
        collections.create_collection(ctx, name=body.name, embedder=body.embedder), embedders=ctx.embedders
    )


@router.get("/collections", response_model=CollectionList)
def list_collections(ctx: ContextDep) -> CollectionList:
    return CollectionList(
        collections=[collection_out(c, embedders=ctx.embedders) for c in collections.list_collections(ctx)]
    )


@router.get("/collections/{name}", response_model=CollectionOut)
def get_collection(name: str, ctx: ContextDep) -> CollectionOut:
    return collection_out(collections.get_collection(ctx, name), embedders=ctx.embedders)


@router.put("/collections/{name}/search-options", response_model=CollectionOut)
def set_search_options(name: str, body: SearchOptionsIn, ctx: ContextDep) -> CollectionOut:
    """Query-side re-ranking used by every search of the collection (a search's ``qe`` overrides it)."""
    tuning.set_search_options(ctx, collection=name, qe=body.qe, qe_alpha=body.qe_alpha)
    return collection_out(collections.get_collection(ctx, name), embedders=ctx.embedders)


@router.put("/collections/{name}/tuning", response_model=CollectionOut)
def set_tuning(name: str, body: TuningIn, ctx: ContextDep) -> CollectionOut:
    """Switch the automatic tuning (whitening and query expansion after imports) on or off; what is
    served now stays until the next tuning (see ``tuning`` in the answer)."""
    autotune.set_autotune(ctx, collection=name, on=body.auto)
    return collection_out(collections.get_collection(ctx, name), embedders=ctx.embedders)


@router.put(
    "/collections/{name}/embedder",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    openapi_extra=security.ADMIN,
)
def change_embedder(
    name: str, body: EmbedderChange, request: Request, ctx: ContextDep, runner: JobsDep
) -> JobAccepted:
    """Re-embed every image with another pretrained embedder in a background job, then switch;
    searches use the old vectors until the new ones are complete (409 if it serves it already,
    422 for a trainable embedder: `cbir train` re-embeds with its checkpoint)."""
    spec, _ = check_reembed(ctx, collection=name, embedder=body.embedder)
    job_id = runner.submit_reembed(collection=name, spec=spec, creator=job_access.creator(request))
    return JobAccepted(job_id=job_id, state="queued", status_url=f"/api/v1/jobs/{job_id}")


@router.post(
    "/collections/{name}/whitening",
    response_model=CollectionOut,
    responses={202: {"model": JobAccepted, "description": "over CBIR_SYNC_COST_BUDGET_S: a job"}},
    openapi_extra=security.ADMIN,
)
def whiten(
    name: str, body: WhiteningIn, request: Request, ctx: ContextDep, tasks: TasksDep
) -> CollectionOut | JSONResponse:
    """Fit a PCA-whitening on the collection's codes and serve the whitened codes (pretrained
    embedders; the index is rebuilt, searches keep using the old codes until it is). Estimated
    over CBIR_SYNC_COST_BUDGET_S (re-embedding a collection that serves whitened codes): a job."""
    found = tuning.whitening_cost(ctx, collection=name, dim=body.dim, shrinkage=body.shrinkage)
    if found.seconds <= ctx.settings.sync_cost_budget_s:
        tuning.whiten_collection(ctx, collection=name, dim=body.dim, shrinkage=body.shrinkage)
        return collection_out(collections.get_collection(ctx, name), embedders=ctx.embedders)
    job_id = tasks.submit(
        kind="whiten",
        collection=name,
        params={"dim": body.dim, "shrinkage": body.shrinkage, "estimate_s": round(found.seconds, 1)},
        work=partial(tuning.whitening_job, ctx, collection=name, dim=body.dim, shrinkage=body.shrinkage),
        creator=job_access.creator(request),
    )
    accepted = JobAccepted(job_id=job_id, state="queued", status_url=f"/api/v1/jobs/{job_id}")
    return JSONResponse(accepted.model_dump(), status_code=status.HTTP_202_ACCEPTED)


@router.delete("/collections/{name}", status_code=status.HTTP_204_NO_CONTENT, openapi_extra=security.ADMIN)
def delete_collection(name: str, ctx: ContextDep) -> Response:
    collections.delete_collection(ctx, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/collections/{name}/images", response_model=list[ImageOut])
def browse_images(
    name: str,
    ctx: ContextDep,
    response: Response,
    image_filter: FilterDep,
    offset: int = Query(0, ge=0, le=MAX_ID),
    limit: int = Query(50, ge=1, le=500),
) -> list[ImageOut]:
    """A page of the collection's images in insertion order; ``X-Total-Count`` gives the total
    (of the images that pass the filter, when there is one)."""
    rows, total = collections.browse_images(ctx, name, offset=offset, limit=limit, image_filter=image_filter)
    response.headers["X-Total-Count"] = str(total)
    return [image_out(row, name) for row in rows]


@router.get("/collections/{name}/labels", response_model=LabelList)
def collection_labels(name: str, ctx: ContextDep, limit: int = Query(100, ge=1, le=1000)) -> LabelList:
    """The collection's labels (metadata ``label``) with their image counts, most common first."""
    summary = collections.label_summary(ctx, name, limit=limit)
    return LabelList(
        collection=name,
        total=summary.total,
        distinct=summary.distinct,
        unlabelled=summary.unlabelled,
        labels=[LabelCount(label=label, count=count) for label, count in summary.labels],
    )


@router.get("/collections/{name}/map", response_model=MapOut)
def collection_map(
    name: str,
    ctx: ContextDep,
    sample: int = Query(5000, ge=1, le=maps.MAX_SAMPLE, description="points, evenly spread by id"),
    method: str = Query("pca", description="pca, or umap where umap-learn is installed"),
) -> MapOut:
    """The collection's stored codes projected to 2-D, with each point's label."""
    result = maps.collection_map(ctx, collection=name, sample=sample, method=method)
    return map_out(result, methods=maps.available_methods())


def _index_out(name: str, status_: IndexStatus) -> IndexOut:
    problems = [IndexProblemOut.of(p) for p in status_.problems]
    return IndexOut.model_validate({"collection": name, **vars(status_), "problems": problems})


@router.get("/collections/{name}/index", response_model=IndexOut, tags=["index"])
def get_index(name: str, ctx: ContextDep) -> IndexOut:
    """The index serving the collection: kind, size, bytes in memory, search parameters, the
    recall@10 measured against exact search with held-out queries (and when), and any rebuild in
    progress."""
    return _index_out(name, index_admin.index_status(ctx, name))


@router.put(
    "/collections/{name}/index",
    response_model=IndexOut,
    tags=["index"],
    responses={202: {"description": "a new kind is being built in the background; the old index serves"}},
    openapi_extra=security.ADMIN,
)
def configure_index(name: str, body: IndexConfigIn, ctx: ContextDep, response: Response) -> IndexOut:
    """Choose the index kind (``auto`` or a FAISS factory string) and search parameters."""
    result, started = index_admin.configure_index(
        ctx, name=name, factory=body.factory, params=body.model_dump(exclude_unset=True, exclude={"factory"})
    )
    if started:
        response.status_code = status.HTTP_202_ACCEPTED
    return _index_out(name, result)


@router.post("/collections/{name}/index/recall", response_model=IndexOut, tags=["index"])
def measure_recall(name: str, ctx: ContextDep) -> IndexOut:
    """Measure recall@10 of the index against exact search, now: a sample of stored vectors as
    queries, each held out (its own image left out of both the exact and the index's top 10)."""
    return _index_out(name, index_admin.measure_recall(ctx, name))
