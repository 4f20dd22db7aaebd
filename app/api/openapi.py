"""The OpenAPI document with the error contract in it: every operation declares the problem+json
(RFC 9457) responses it can give, so contract tests (schemathesis) validate error bodies too."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.problems import MEDIA_TYPE
from app.api.schemas import Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

# What each status means on this service (README "Error contract"). 401/403, 429 and 503 can
# answer any request: keys and scopes, the rate limit, a database outage or a read-only folder.
ANY_REQUEST = {
    401: "An API key is required",
    403: "The API key lacks the scope needed (or the folder is outside the import roots)",
    429: "Rate limited; see Retry-After",
    503: "Overloaded, rebuilding, read-only or the database is unreachable; see Retry-After",
}
WITH_PARAMETERS = {422: "Invalid parameter, or an undecodable image"}
WITH_PATH_PARAMETERS = {404: "Not found"}
WITH_BODY = {
    400: "Malformed request (an empty file, a bad multipart body)",
    413: "Too large (the request body, the file or the image's pixels)",
    415: "Unsupported format (image or archive)",
    422: "Invalid parameter, or an undecodable image",
}
WRITES = {409: "Conflict with the current state", 507: "Out of storage"}
# Searches of a collection whose embedder has no trained checkpoint yet, or that is re-embedding.
COLLECTION_STATE = {409: "The collection is not ready for this (no trained checkpoint, a job running)"}
WRITE_METHODS = frozenset({"post", "put", "patch", "delete"})


def error_statuses(path: str, method: str, operation: dict[str, Any]) -> dict[int, str]:
    """The error statuses an operation can answer with, by the shape of the operation."""
    statuses = dict(ANY_REQUEST)
    if path.startswith("/api/v1/collections/{name}"):
        statuses.update(COLLECTION_STATE)
    parameters = operation.get("parameters", [])
    if parameters or "requestBody" in operation:
        statuses.update(WITH_PARAMETERS)
    if any(p.get("in") == "path" for p in parameters):
        statuses.update(WITH_PATH_PARAMETERS)
    if "requestBody" in operation:
        statuses.update(WITH_BODY)
    if method in WRITE_METHODS:
        statuses.update(WRITES)
    return statuses


def add_problem_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare ``application/problem+json`` error responses on every operation of ``schema`` (in
    place); errors a route declares itself (``responses=``) get the problem body too."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema()
    problem["additionalProperties"] = True  # RFC 9457 extension members
    components["Problem"] = problem
    for path, path_item in schema.get("paths", {}).items():
        for method, operation in path_item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            if responses.get("422", {}).get("description") == "Validation Error":
                del responses["422"]  # FastAPI's default, with a body this service never sends
            for status, description in error_statuses(path, method, operation).items():
                responses.setdefault(str(status), {"description": description})
            for status, response in responses.items():  # with those a route declares itself
                if status[:1] in "45":
                    response["content"] = {MEDIA_TYPE: {"schema": PROBLEM_REF}}
            operation["responses"] = dict(sorted(responses.items()))
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    """Serve the post-processed document at /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_problem_responses(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    openapi_version=app.openapi_version,
                    description=app.description,
                    routes=app.routes,
                    tags=app.openapi_tags,
                    servers=app.servers,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
