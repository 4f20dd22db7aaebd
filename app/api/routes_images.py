from __future__ import annotations

import re
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile as StarletteUpload

from app.api import security
from app.api.deps import MAX_ID, ContextDep, FilterDep, ImageId, parse_metadata, read_upload
from app.api.disconnect import run_cancellable
from app.api.forms import Utf8FormRoute
from app.api.headers import IMAGE_CSP, download_name
from app.api.limits import BATCH_FORM_LIMITS, EXAMPLE_FORM_LIMITS
from app.api.parameters import FormId
from app.api.presenters import compare_out, examples_out, hits_out, image_out, search_out
from app.api.schemas import (
    BatchEntryOut,
    BatchSearchResponse,
    CompareResponse,
    ImageCreated,
    ImageOut,
    Problem,
    SearchResponse,
)
from app.catalog import images
from app.core.errors import CbirError, InvalidRequest
from app.data.storage import EXTENSIONS
from app.ingest.store import add_image
from app.search import batch, compare, examples
from app.search import query as search
from app.search.batch import BatchQuery
from app.search.examples import Example
from app.search.query import SearchResult
from index import SearchKnobs

# Utf8FormRoute: a form part or file name that is not UTF-8 is refused, never read as Latin-1.
router = APIRouter(tags=["images"], route_class=Utf8FormRoute)
IMMUTABLE = {
    "Cache-Control": "public, max-age=31536000, immutable",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": IMAGE_CSP,
}
DOWNLOAD = Query(False, description="true: as an attachment (Content-Disposition), named after the upload")


@router.post(
    "/collections/{name}/images",
    response_model=ImageCreated,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "The same bytes are already stored: the existing image"}},
)
async def upload_image(
    name: str,
    ctx: ContextDep,
    response: Response,
    file: Annotated[UploadFile, File(description="PNG, JPEG, GIF or WebP")],
    metadata: Annotated[str | None, Form(description='a JSON object, e.g. {"label": "7"}')] = None,
) -> ImageCreated:
    data = await read_upload(file, limit=ctx.settings.max_upload_bytes)
    meta = parse_metadata(metadata)
    result = await run_in_threadpool(
        add_image, ctx, collection=name, data=data, name=file.filename, metadata=meta
    )
    assert result.image_id is not None
    stored = await run_in_threadpool(images.get_image, ctx, result.image_id)
    created = result.status == "added"
    if not created:
        response.status_code = status.HTTP_200_OK
    return ImageCreated(
        id=result.image_id, created=created, image=image_out(stored.record, stored.collection)
    )


@router.get("/images/{image_id}", response_model=ImageOut)
def get_image(
    image_id: ImageId,
    ctx: ContextDep,
    include: Literal["embedding"] | None = Query(None, description="embedding: add the stored vector"),
) -> ImageOut:
    stored = images.get_image(ctx, image_id)
    out = image_out(stored.record, stored.collection)
    if include == "embedding" and (vector := images.stored_embedding(ctx, image_id)) is not None:
        out.embedding = vector.tolist()
    return out


@router.get(
    "/images/{image_id}/file", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}}
)
def image_file(image_id: ImageId, ctx: ContextDep, download: bool = DOWNLOAD) -> FileResponse:
    path, media_type = images.image_file(ctx, image_id)
    if not download:
        return FileResponse(path, media_type=media_type, headers=IMMUTABLE)
    record = images.get_image(ctx, image_id).record
    name = download_name(record.original_name, image_id=image_id, extension=EXTENSIONS[record.format])
    return FileResponse(
        path, media_type=media_type, headers=IMMUTABLE, filename=name, content_disposition_type="attachment"
    )


@router.get(
    "/images/{image_id}/thumbnail", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}}
)
def image_thumbnail(
    image_id: ImageId, ctx: ContextDep, size: int = Query(128, ge=16, le=512)
) -> FileResponse:
    path, media_type = images.thumbnail(ctx, image_id, size=size)
    return FileResponse(path, media_type=media_type, headers=IMMUTABLE)


@router.delete("/images/{image_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_image(image_id: ImageId, ctx: ContextDep) -> Response:
    images.delete_image(ctx, image_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


QE = Query(None, ge=0, le=20, description="alpha-QE depth for this search (default: the collection's)")
EF_SEARCH = Query(None, ge=1, le=4096, description="HNSW candidates for this search (default: the index's)")
NPROBE = Query(None, ge=1, le=65536, description="IVF lists visited by this search (default: the index's)")
K_FACTOR = Query(
    None, ge=1, le=100, description="re-ranked kinds: candidates = k x this (default: the index's)"
)


def _knobs(ef_search: int | None, nprobe: int | None, k_factor: float | None) -> SearchKnobs | None:
    knobs = SearchKnobs(ef_search=ef_search, nprobe=nprobe, k_factor=k_factor)
    return knobs or None


@router.get("/collections/{name}/images/{image_id}/similar", response_model=SearchResponse)
def similar(
    name: str,
    image_id: ImageId,
    ctx: ContextDep,
    image_filter: FilterDep,
    k: int = Query(10, ge=1),
    qe: int | None = QE,
    ef_search: int | None = EF_SEARCH,
    nprobe: int | None = NPROBE,
    k_factor: float | None = K_FACTOR,
) -> SearchResponse:
    return search_out(
        search.similar_to(
            ctx,
            collection=name,
            image_id=image_id,
            k=k,
            image_filter=image_filter,
            qe=qe,
            knobs=_knobs(ef_search, nprobe, k_factor),
        )
    )


POSITIVE_WEIGHT = Form(
    gt=0,
    le=examples.MAX_WEIGHT,
    allow_inf_nan=False,
    description=f"the positives' weight in the combined query (default {examples.POSITIVE_WEIGHT:g})",
)
NEGATIVE_WEIGHT = Form(
    ge=0,
    le=examples.MAX_WEIGHT,
    allow_inf_nan=False,
    description=f"the negatives' weight in the combined query (default {examples.NEGATIVE_WEIGHT:g})",
)


async def _upload_example(upload: UploadFile, *, limit: int) -> Example:
    return Example(data=await read_upload(upload, limit=limit), name=upload.filename)


@router.post(
    "/collections/{name}/search",
    response_model=SearchResponse,
    tags=["search"],
    openapi_extra=security.READ,
    form_limits=EXAMPLE_FORM_LIMITS,
)
async def search_by_image(
    name: str,
    ctx: ContextDep,
    image_filter: FilterDep,
    file: Annotated[
        UploadFile | None, File(description="the query image: PNG, JPEG, GIF or WebP (a positive example)")
    ] = None,
    positive_file: Annotated[
        list[UploadFile] | None, File(description="more positive examples: images (repeat the part)")
    ] = None,
    positive: Annotated[
        list[FormId] | None, Form(description="stored images of the collection as positive examples")
    ] = None,
    negative_file: Annotated[
        list[UploadFile] | None, File(description="negative examples: images (repeat the part)")
    ] = None,
    negative: Annotated[
        list[FormId] | None, Form(description="stored images of the collection as negative examples")
    ] = None,
    positive_weight: Annotated[float | None, POSITIVE_WEIGHT] = None,
    negative_weight: Annotated[float | None, NEGATIVE_WEIGHT] = None,
    k: int = Query(10, ge=1, description="number of hits, at most CBIR_MAX_K (100)"),
    qe: int | None = QE,
    ef_search: int | None = EF_SEARCH,
    nprobe: int | None = NPROBE,
    k_factor: float | None = K_FACTOR,
) -> SearchResponse:
    """The images most like one query image (``file``), or like several examples: positive
    ones (``file``, ``positive_file``, ``positive`` ids) and negative ones (``negative_file``,
    ``negative`` ids), combined into one query
    ``normalize(positive_weight * mean(positives) - negative_weight * mean(negatives))`` over
    their L2-normalised codes; the stored examples are left out of the hits and the response's
    ``query`` says what was combined. At most 16 examples; the uploads of one search share the
    body limit (CBIR_MAX_UPLOAD_BYTES)."""
    knobs = _knobs(ef_search, nprobe, k_factor)
    several = positive_file or positive or negative_file or negative
    if not several and positive_weight is None and negative_weight is None:
        if file is None:
            raise InvalidRequest("send the query image as the file part (or examples: see the docs)")
        data = await read_upload(file, limit=ctx.settings.max_upload_bytes)
        result = await run_in_threadpool(
            search.search_by_image,
            ctx,
            collection=name,
            data=data,
            k=k,
            image_filter=image_filter,
            qe=qe,
            knobs=knobs,
        )
        return search_out(result)
    limit = ctx.settings.max_upload_bytes
    positives = [
        await _upload_example(f, limit=limit) for f in [*([file] if file else []), *(positive_file or [])]
    ]
    positives += [Example(image_id=i) for i in positive or []]
    negatives = [await _upload_example(f, limit=limit) for f in negative_file or []]
    negatives += [Example(image_id=i) for i in negative or []]
    found = await run_in_threadpool(
        examples.search_by_examples,
        ctx,
        collection=name,
        positives=positives,
        negatives=negatives,
        positive_weight=examples.POSITIVE_WEIGHT if positive_weight is None else positive_weight,
        negative_weight=examples.NEGATIVE_WEIGHT if negative_weight is None else negative_weight,
        k=k,
        image_filter=image_filter,
        qe=qe,
        knobs=knobs,
    )
    return examples_out(found)


BATCH_PARTS = ("file", "image_id")


@router.post(
    "/collections/{name}/search/batch",
    response_model=BatchSearchResponse,
    tags=["search"],
    openapi_extra=security.READ,
    form_limits=BATCH_FORM_LIMITS,
)
async def search_batch(
    name: str,
    request: Request,
    ctx: ContextDep,
    image_filter: FilterDep,
    file: Annotated[
        list[UploadFile] | None, File(description="query images (repeat the part): PNG, JPEG, GIF or WebP")
    ] = None,
    image_id: Annotated[
        list[str] | None, Form(description="stored images of the collection as queries (repeat the part)")
    ] = None,
    k: int = Query(10, ge=1, description="hits per query, at most CBIR_MAX_K (100)"),
    qe: int | None = QE,
    ef_search: int | None = EF_SEARCH,
    nprobe: int | None = NPROBE,
    k_factor: float | None = K_FACTOR,
) -> BatchSearchResponse:
    """Up to 100 queries in one request, each answered as ``POST /search`` (a file part) or
    ``GET /images/{id}/similar`` (an ``image_id`` part) answers it, in the order of the parts: all
    embedded in one batch and searched in one index call. A query that cannot be searched (an
    image that does not decode, an id not in the collection) has its problem in its entry."""
    parts = [(key, value) for key, value in (await request.form()).multi_items()]
    if unknown := sorted({key for key, _ in parts} - set(BATCH_PARTS)):
        raise InvalidRequest(f"unknown form part {unknown[0][:60]!r}: send file and image_id parts")
    queries: list[BatchQuery] = []
    sources: list[dict[str, Any]] = []
    for key, value in parts:  # FastAPI checked the types: file parts are files, image_id text
        if key == "file" and isinstance(value, StarletteUpload):
            sources.append({"file": value.filename})
            try:
                queries.append(
                    BatchQuery(
                        data=await read_upload(cast(UploadFile, value), limit=ctx.settings.max_upload_bytes)
                    )
                )
            except CbirError as exc:
                queries.append(BatchQuery(error=exc))
        else:
            text = str(value)
            sources.append({"image_id": int(text) if _ID.fullmatch(text) else None})
            queries.append(_stored_query(text))
    result = await run_in_threadpool(
        batch.search_batch,
        ctx,
        collection=name,
        queries=queries,
        k=k,
        image_filter=image_filter,
        qe=qe,
        knobs=_knobs(ef_search, nprobe, k_factor),
    )
    return BatchSearchResponse(
        collection=result.collection,
        k=result.k,
        results=[
            BatchEntryOut(
                index=i,
                **source,
                hits=hits_out(SearchResult(collection=result.collection, k=result.k, hits=entry.hits)),
                error=None if entry.error is None else _problem(entry.error),
            )
            for i, (source, entry) in enumerate(zip(sources, result.entries, strict=True))
        ],
        timings_ms=result.timings_ms,
    )


_ID = re.compile(r"[0-9]{1,19}")


def _stored_query(value: str) -> BatchQuery:
    if _ID.fullmatch(value) and 1 <= int(value) <= MAX_ID:
        return BatchQuery(image_id=int(value))
    return BatchQuery(
        error=InvalidRequest(f"an image_id is a decimal integer in 1..{MAX_ID}, not {value[:40]!r}")
    )


def _problem(error: CbirError) -> Problem:
    return Problem(title=error.title, status=error.status, detail=error.detail, code=error.code)


AGAINST = Query(description="the other embedder: a registered one (pixels) or checkpoint:ID")
SAMPLE = Query(ge=1, le=compare.MAX_SAMPLE, description="images both sides search")


# Compare embeds a sample with another model: the write scope, like other work that costs CPU.
@router.post(
    "/collections/{name}/compare",
    response_model=CompareResponse,
    tags=["search"],
    openapi_extra=security.WRITE,
)
async def compare_by_image(
    name: str,
    request: Request,
    ctx: ContextDep,
    file: Annotated[UploadFile, File(description="the query image: PNG, JPEG, GIF or WebP")],
    against: Annotated[str, AGAINST],
    k: int = Query(10, ge=1),
    sample: Annotated[int, SAMPLE] = 2000,
) -> CompareResponse:
    """The query side by side: the collection's embedder and ``against``, over the same
    ``sample`` images (evenly spread over the collection); the second side's codes are
    computed on the fly (cached for the last two samples). 422 ``over_budget`` when that is
    estimated over CBIR_SYNC_COST_BUDGET_S (the detail names the sample that fits)."""
    data = await read_upload(file, limit=ctx.settings.max_upload_bytes)
    result = await run_cancellable(
        request, compare.compare, ctx=ctx, collection=name, against=against, k=k, sample=sample, data=data
    )
    return compare_out(result)


@router.get(
    "/collections/{name}/images/{image_id}/compare",
    response_model=CompareResponse,
    tags=["search"],
    openapi_extra=security.WRITE,
)
async def compare_stored(
    name: str,
    image_id: ImageId,
    request: Request,
    ctx: ContextDep,
    against: Annotated[str, AGAINST],
    k: int = Query(10, ge=1),
    sample: Annotated[int, SAMPLE] = 2000,
) -> CompareResponse:
    """Like ``POST /compare`` with a stored image as the query (left out of both sides)."""
    result = await run_cancellable(
        request,
        compare.compare,
        ctx=ctx,
        collection=name,
        against=against,
        k=k,
        sample=sample,
        image_id=image_id,
    )
    return compare_out(result)
