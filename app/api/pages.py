"""The web page: server-rendered shell, plain JavaScript talks to the REST API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.api.deps import ContextDep
from app.services.collections import list_collections

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent.parent / "templates")


@router.get("/", response_class=HTMLResponse)
def home(request: Request, ctx: ContextDep, collection: str | None = None) -> HTMLResponse:
    collections = list_collections(ctx)
    names = [c.name for c in collections]
    searchable = [c.name for c in collections if c.ready]
    # An explicit choice wins, even a collection that cannot be searched yet (the page says why).
    selected = collection if collection in names else next(iter(searchable or names), None)
    return templates.TemplateResponse(
        request,
        "index.html",
        {"collections": collections, "selected": selected, "max_k": ctx.settings.max_k},
    )
