from __future__ import annotations

from fastapi import APIRouter

from app import __version__
from app.api.deps import ContextDep
from app.api.schemas import CollectionHealth, Health
from app.services.collections import list_collections

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health(ctx: ContextDep) -> Health:
    return Health(
        status="ok",
        version=__version__,
        device=ctx.device.type,
        collections=[
            CollectionHealth(name=c.name, images=c.image_count, indexed=c.index_size)
            for c in list_collections(ctx)
        ],
    )
