"""Request parameters read one way only: no value is silently chosen among several.

A query parameter that takes one value (``k``, ``limit``) given twice is a 422, whichever copy
FastAPI would have kept; parameters declared as lists (``label``, ``meta``) stay repeatable. A
form part a route takes once (the upload's ``file`` and ``metadata``, the query image of a
search) sent twice is a 400 ``bad_multipart``. Decided from the route's own declarations, so a
new API route is covered without anyone remembering to. Web pages are lenient: a link built by
appending gives them ``?collection=a&collection=b`` and they render the first (app/web/pages.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import Path, Request, params
from pydantic import BeforeValidator, Field

from app.core.errors import BadMultipart, InvalidRequest

# The largest id the database stores (a signed 64-bit integer): a larger one is a 422, not an
# OverflowError in the driver.
MAX_ID = 2**63 - 1
_DECIMAL = re.compile(r"[0-9]{1,30}")


def _decimal(value: object) -> object:
    """Lax int parsing would take "1.0", "+1", "1_0" or " 1" as an id: only digits are one."""
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise ValueError("an id is a decimal integer (the digits 0-9 only)")
    return value


ImageId = Annotated[int, BeforeValidator(_decimal), Path(ge=1, le=MAX_ID)]
# The same in a form part (the stored examples of a search).
FormId = Annotated[int, BeforeValidator(_decimal), Field(ge=1, le=MAX_ID)]


def _repeatable(annotation: Any) -> bool:
    """Whether a parameter of this type takes several values (``list[str] | None``)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _repeatable(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return any(_repeatable(arg) for arg in get_args(annotation))
    return isinstance(origin, type) and issubclass(origin, Sequence | set | frozenset) and origin is not str


def _single(fields: list[Any]) -> list[str]:
    return [field.alias for field in fields if not _repeatable(field.field_info.annotation)]


def _single_query_names(dependant: Any) -> list[str]:
    names = _single(dependant.query_params)
    for sub in dependant.dependencies:
        names += _single_query_names(sub)
    return names


def _single_names(route: Any, dependant: Any) -> tuple[list[str], list[str]]:
    """(single-valued query parameters, single form parts) of a route; found once per route and
    kept on it (it lives as long as its app)."""
    found: tuple[list[str], list[str]] | None = getattr(route, "_cbir_single_names", None)
    if found is None:
        form_parts = [f for f in dependant.body_params if isinstance(f.field_info, params.Form | params.File)]
        found = (_single_query_names(dependant), _single(form_parts))
        route._cbir_single_names = found
    return found


async def reject_repeated_parameters(request: Request) -> None:
    """The dependency of every API router (app/main.py; pages take the first value): 422 for a
    single-valued query parameter given more than once, 400 ``bad_multipart`` for a single form
    part sent more than once."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    query_names, form_names = _single_names(route, dependant)
    for name in query_names:
        if (count := len(request.query_params.getlist(name))) > 1:
            raise InvalidRequest(f"the query parameter {name!r} is given {count} times; give it once")
    if not form_names:
        return
    # FastAPI parsed the form before solving dependencies: this is its cached copy.
    form = await request.form()
    for name in form_names:
        if (count := len(form.getlist(name))) > 1:
            raise BadMultipart(f"the form part {name!r} is sent {count} times; send it once")
