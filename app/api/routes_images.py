from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.api.deps import ContextDep, parse_metadata, read_upload
from app.api.presenters import image_out, search_out
from app.api.schemas import ImageCreated, ImageOut, SearchResponse
from app.services import images, search
from app.services.ingest import add_image

router = APIRouter(tags=["images"])
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}


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
def get_image(image_id: int, ctx: ContextDep) -> ImageOut:
    stored = images.get_image(ctx, image_id)
    return image_out(stored.record, stored.collection)


@router.get(
    "/images/{image_id}/file", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}}
)
def image_file(image_id: int, ctx: ContextDep) -> FileResponse:
    path, media_type = images.image_file(ctx, image_id)
    return FileResponse(path, media_type=media_type, headers=IMMUTABLE)


@router.get(
    "/images/{image_id}/thumbnail", response_class=FileResponse, responses={200: {"content": {"image/*": {}}}}
)
def image_thumbnail(image_id: int, ctx: ContextDep, size: int = Query(128, ge=16, le=512)) -> FileResponse:
    path, media_type = images.thumbnail(ctx, image_id, size=size)
    return FileResponse(path, media_type=media_type, headers=IMMUTABLE)


@router.delete("/images/{image_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_image(image_id: int, ctx: ContextDep) -> Response:
    images.delete_image(ctx, image_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/collections/{name}/images/{image_id}/similar", response_model=SearchResponse)
def similar(name: str, image_id: int, ctx: ContextDep, k: int = Query(10, ge=1)) -> SearchResponse:
    return search_out(search.similar_to(ctx, collection=name, image_id=image_id, k=k))


@router.post("/collections/{name}/search", response_model=SearchResponse, tags=["search"])
async def search_by_image(
    name: str,
    ctx: ContextDep,
    file: Annotated[UploadFile, File(description="the query image: PNG, JPEG, GIF or WebP")],
    k: int = Query(10, ge=1, description="number of hits, at most CBIR_MAX_K (100)"),
) -> SearchResponse:
    data = await read_upload(file, limit=ctx.settings.max_upload_bytes)
    result = await run_in_threadpool(search.search_by_image, ctx, collection=name, data=data, k=k)
    return search_out(result)
