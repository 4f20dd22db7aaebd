"""The web pages: server-rendered shells; plain JavaScript loads the data from the REST API.

Each route only lists the collections (what ``list_collections`` already costs) and renders:
images, counts, jobs and results come from the JSON API after the page is shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.api.deps import ContextDep
from app.catalog.collections import CollectionInfo, list_collections
from app.duplicates.defaults import default_threshold
from app.embedding.embedders import embedder_choices
from app.ingest.sources.datasets import DATASETS
from index.projection import available_methods

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")

NAV = (
    ("search", "/", "Search"),
    ("browse", "/browse", "Browse"),
    ("import", "/import", "Import"),
    ("evaluate", "/evaluate", "Evaluate"),
    ("map", "/map", "Map"),
    ("duplicates", "/duplicates", "Duplicates"),
)


def _first_collection(request: Request) -> str | None:
    """``?collection=``; given more than once, the first: a page renders what it can (the API
    refuses a repeated parameter, app/api/parameters.py)."""
    values = request.query_params.getlist("collection")
    return values[0] if values else None


ChosenCollection = Annotated[str | None, Depends(_first_collection)]


def _selected(collections: list[CollectionInfo], wanted: str | None, *, ready_first: bool) -> str | None:
    """An explicit choice wins, even a collection that cannot be searched yet (the page says why)."""
    names = [c.name for c in collections]
    if wanted in names:
        return wanted
    preferred = [c.name for c in collections if c.ready] if ready_first else []
    return next(iter(preferred or names), None)


def _render(
    request: Request,
    ctx: ContextDep,
    *,
    template: str,
    page: str,
    collection: str | None,
    ready_first: bool = True,
    **extra: Any,
) -> HTMLResponse:
    collections = list_collections(ctx)
    selected = _selected(collections, collection, ready_first=ready_first)
    return templates.TemplateResponse(
        request,
        template,
        {
            "collections": collections,
            "selected": selected,
            "page": page,
            "nav": NAV,
            "max_k": ctx.settings.max_k,
            **extra,
        },
    )


@router.get("/", response_class=HTMLResponse)
def home(request: Request, ctx: ContextDep, collection: ChosenCollection) -> HTMLResponse:
    return _render(request, ctx, template="index.html", page="search", collection=collection)


@router.get("/browse", response_class=HTMLResponse)
def browse(request: Request, ctx: ContextDep, collection: ChosenCollection) -> HTMLResponse:
    return _render(
        request, ctx, template="browse.html", page="browse", collection=collection, ready_first=False
    )


@router.get("/import", response_class=HTMLResponse)
def import_page(request: Request, ctx: ContextDep, collection: ChosenCollection) -> HTMLResponse:
    return _render(
        request,
        ctx,
        template="import.html",
        page="import",
        collection=collection,
        ready_first=False,
        embedders=embedder_choices(),
        default_embedder=ctx.settings.default_embedder,
        datasets=DATASETS,
        import_roots=[str(root) for root in ctx.settings.import_root_paths],
    )


@router.get("/evaluate", response_class=HTMLResponse)
def evaluate(request: Request, ctx: ContextDep, collection: ChosenCollection) -> HTMLResponse:
    return _render(request, ctx, template="evaluate.html", page="evaluate", collection=collection)


@router.get("/map", response_class=HTMLResponse)
def map_page(request: Request, ctx: ContextDep, collection: ChosenCollection) -> HTMLResponse:
    return _render(
        request, ctx, template="map.html", page="map", collection=collection, methods=available_methods()
    )


@router.get("/duplicates", response_class=HTMLResponse)
def duplicates_page(request: Request, ctx: ContextDep, collection: ChosenCollection) -> HTMLResponse:
    # the default threshold depends on the selected collection's embedder: the template asks
    return _render(
        request,
        ctx,
        template="duplicates.html",
        page="duplicates",
        collection=collection,
        default_threshold=default_threshold,
    )
