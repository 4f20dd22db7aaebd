from __future__ import annotations

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import func, select

from app.api.deps import ContextDep
from app.api.presenters import collection_out, image_out
from app.api.schemas import CollectionCreate, CollectionList, CollectionOut, ImageOut
from app.records import ImageRecord
from app.services import collections

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


@router.delete("/collections/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_collection(name: str, ctx: ContextDep) -> Response:
    collections.delete_collection(ctx, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/collections/{name}/images", response_model=list[ImageOut])
def browse_images(
    name: str,
    ctx: ContextDep,
    response: Response,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
) -> list[ImageOut]:
    """A page of the collection's images in insertion order; ``X-Total-Count`` gives the total."""
    with ctx.db.session() as session:
        record = collections.require_collection(session, name)
        total = session.scalar(
            select(func.count()).select_from(ImageRecord).where(ImageRecord.collection_id == record.id)
        )
        rows = session.scalars(
            select(ImageRecord)
            .where(ImageRecord.collection_id == record.id)
            .order_by(ImageRecord.id)
            .offset(offset)
            .limit(limit)
        ).all()
    response.headers["X-Total-Count"] = str(total or 0)
    return [image_out(row, name) for row in rows]
