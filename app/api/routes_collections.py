from __future__ import annotations

from fastapi import APIRouter, Query, Response, status

from app.api.deps import ContextDep, FilterDep
from app.api.presenters import collection_out, image_out, map_out
from app.api.schemas import (
    CollectionCreate,
    CollectionList,
    CollectionOut,
    EvaluateIn,
    EvaluateOut,
    EvaluateRow,
    ImageOut,
    LabelCount,
    LabelList,
    MapOut,
    SearchOptionsIn,
    WhiteningIn,
)
from app.services import collections, maps, tuning

router = APIRouter(tags=["collections"])


@router.post("/collections", status_code=status.HTTP_201_CREATED, response_model=CollectionOut)
def create_collection(body: CollectionCreate, ctx: ContextDep) -> CollectionOut:
    return collection_out(collections.create_collection(ctx, name=body.name, embedder=body.embedder))


@router.get("/collections", response_model=CollectionList)
def list_collections(ctx: ContextDep) -> CollectionList:
    return CollectionList(collections=[collection_out(c) for c in collections.list_collections(ctx)])


@router.get("/collections/{name}", response_model=CollectionOut)
def get_collection(name: str, ctx: ContextDep) -> CollectionOut:
    return collection_out(collections.get_collection(ctx, name))


@router.put("/collections/{name}/search-options", response_model=CollectionOut)
def set_search_options(name: str, body: SearchOptionsIn, ctx: ContextDep) -> CollectionOut:
    """Query-side re-ranking used by every search of the collection (a search's ``qe`` overrides it)."""
    tuning.set_search_options(ctx, collection=name, qe=body.qe, qe_alpha=body.qe_alpha)
    return collection_out(collections.get_collection(ctx, name))


@router.post("/collections/{name}/whitening", response_model=CollectionOut)
def whiten(name: str, body: WhiteningIn, ctx: ContextDep) -> CollectionOut:
    """Fit a PCA-whitening on the collection's codes and serve the whitened codes (pretrained
    embedders; the index is rebuilt, searches keep using the old codes until it is)."""
    tuning.whiten_collection(ctx, collection=name, dim=body.dim, shrinkage=body.shrinkage)
    return collection_out(collections.get_collection(ctx, name))


@router.post("/collections/{name}/evaluate", response_model=EvaluateOut, tags=["evaluation"])
def evaluate(name: str, body: EvaluateIn, ctx: ContextDep) -> EvaluateOut:
    """P@10, mAP@10 and mAP over the full ranking per embedder (and whitening / QE setting), now:
    with ``groundtruth`` Holidays-style, or against a labelled ``queries`` set."""
    rows = tuning.evaluate_request(
        ctx,
        collection=name,
        queries=body.queries,
        groundtruth=body.groundtruth,
        embedders=tuple(body.embedders),
        whiten=tuple(body.whiten),
        qe=tuple(body.qe),
        qe_alpha=body.qe_alpha,
        limit=body.limit,
    )
    return EvaluateOut(collection=name, results=[EvaluateRow.model_validate(row) for row in rows])


@router.delete("/collections/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_collection(name: str, ctx: ContextDep) -> Response:
    collections.delete_collection(ctx, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/collections/{name}/images", response_model=list[ImageOut])
def browse_images(
    name: str,
    ctx: ContextDep,
    response: Response,
    image_filter: FilterDep,
    offset: int = Query(0, ge=0),
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
