"""Shape service results into response models."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.api.evaluation_schemas import EvaluationOut
from app.api.job_access import Viewer
from app.api.schemas import (
    CollectionOut,
    CompareResponse,
    CompareSide,
    ExampleOut,
    ExamplesQueryOut,
    HitOut,
    ImageOut,
    JobError,
    JobOut,
    MapOut,
    MapPointOut,
    RuntimeOut,
    SearchResponse,
    SelectionOut,
)
from app.catalog.collections import CollectionInfo
from app.core.redaction import redact_url, scrub_text
from app.core.usertext import printable, servable
from app.data.records import ImageRecord
from app.embedding.embedders import EmbedderCache
from app.ingest.jobs import JobInfo
from app.learning.evaluation_runs import EvaluationStatus
from app.search.compare import Comparison
from app.search.examples import ExamplesResult, UsedExample
from app.search.maps import CollectionMap
from app.search.query import SearchResult

API = "/api/v1"


def image_urls(image_id: int) -> tuple[str, str]:
    return f"{API}/images/{image_id}/file", f"{API}/images/{image_id}/thumbnail"


def collection_out(info: CollectionInfo, *, embedders: EmbedderCache | None = None) -> CollectionOut:
    out = CollectionOut.model_validate(info, from_attributes=True)
    if info.selection is not None:  # selection.py records it with the winner, classifier.py with a head
        out.selection = SelectionOut.model_validate(info.selection)
    runtime = embedders.runtime_of(info.embedder) if embedders is not None else None
    if runtime is not None:
        out.runtime = RuntimeOut.model_validate(runtime)
    return out


def _name(name: str | None) -> str | None:
    return None if name is None else printable(name)


# Metadata, names and job errors go through ``servable``: a row an older version stored with NaN
# or a lone surrogate is shown with null or U+FFFD, never a 500.
def image_out(record: ImageRecord, collection: str) -> ImageOut:
    image_url, thumbnail_url = image_urls(record.id)
    return ImageOut(
        id=record.id,
        collection=collection,
        sha256=record.sha256,
        format=record.format,
        width=record.width,
        height=record.height,
        byte_size=record.byte_size,
        original_name=_name(record.original_name),
        metadata=servable(record.meta or {}),
        created_at=record.created_at,
        image_url=image_url,
        thumbnail_url=thumbnail_url,
    )


def hits_out(result: SearchResult) -> list[HitOut]:
    hits = []
    for hit in result.hits:
        image_url, thumbnail_url = image_urls(hit.image_id)
        meta = servable(hit.record.meta or {})
        label = meta.get("label")
        hits.append(
            HitOut(
                rank=hit.rank,
                id=hit.image_id,
                score=round(hit.score, 6),
                label=None if label is None else str(label),
                metadata=meta,
                original_name=_name(hit.record.original_name),
                image_url=image_url,
                thumbnail_url=thumbnail_url,
            )
        )
    return hits


def search_out(result: SearchResult) -> SearchResponse:
    return SearchResponse(
        collection=result.collection,
        k=result.k,
        query_image_id=result.query_image_id,
        hits=hits_out(result),
        timings_ms=result.timings_ms,
    )


def examples_out(result: ExamplesResult) -> SearchResponse:
    out = search_out(result)
    out.query = ExamplesQueryOut(
        positive=[_example_out(used) for used in result.positive],
        negative=[_example_out(used) for used in result.negative],
        positive_weight=result.positive_weight,
        negative_weight=result.negative_weight,
    )
    return out


def _example_out(used: UsedExample) -> ExampleOut:
    name = used.example.name
    if used.example.image_id is None and name is None:
        name = ""  # an upload without a file name: still not an id
    return ExampleOut(
        image_id=used.example.image_id,
        file=None if name is None else printable(name),
        weight=used.weight,
    )


def compare_out(comparison: Comparison) -> CompareResponse:
    return CompareResponse(
        collection=comparison.collection,
        k=comparison.k,
        query_image_id=comparison.query_image_id,
        sample=comparison.sample,
        total=comparison.total,
        sides=[
            CompareSide(
                embedder=side.embedder,
                source=side.source,
                hits=hits_out(side.result),
                timings_ms=side.result.timings_ms,
            )
            for side in comparison.sides
        ],
    )


def map_out(result: CollectionMap, *, methods: list[str]) -> MapOut:
    return MapOut(
        collection=result.collection,
        embedder_version=result.embedder_version,
        method=result.method,
        methods=methods,
        sample=len(result.points),
        total=result.total,
        explained_variance=result.explained_variance,
        points=[MapPointOut(id=p.id, x=p.x, y=p.y, label=p.label) for p in result.points],
    )


def evaluation_out(
    status: EvaluationStatus, *, query_sets: list[str], choices: list[dict[str, str]]
) -> EvaluationOut:
    return EvaluationOut.model_validate(
        {
            "collection": status.collection,
            "embedder_version": status.embedder_version,
            "query_sets": query_sets,
            "compare_choices": choices,
            "running": status.running,
            "latest": status.latest,
            "failure": status.failure,
        }
    )


def job_out(info: JobInfo, *, viewer: Viewer, max_errors: int | None = None) -> JobOut:
    """The job as ``viewer`` may see it (app/api/job_access.py). ``max_errors`` keeps only the
    first per-item errors (the list view; ``failed`` counts all)."""
    r = info.record
    details = viewer.sees_details(r)
    return JobOut(
        id=r.id,
        kind=r.kind,
        collection=info.collection,
        state=r.state,
        params=_public_params(r.params or {}, viewer=viewer),
        total=r.total,
        done=r.done,
        added=r.added,
        duplicates=r.duplicates,
        failed=r.failed,
        # Text is scrubbed of URL secrets here too: rows written by older versions hold them.
        errors=[JobError(**_scrubbed(servable(e))) for e in (r.errors or [])[:max_errors]] if details else [],
        error=scrub_text(r.error) if r.error and details else _hidden(r.error),
        resumes=r.resumes or 0,
        images_per_second=info.images_per_second,
        eta_seconds=_eta(info),
        created_at=r.created_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


URLS_SHOWN = 5
SERVER_PATHS = {"folder": "path", "holidays": "path", "manifest": "path", "idx": "images"}


def _scrubbed(error: dict[str, Any]) -> dict[str, Any]:
    return {k: scrub_text(v) if isinstance(v, str) else v for k, v in error.items()}


def _hidden(error: str | None) -> str | None:
    return None if error is None else "the job failed; its details need the scope of the key that started it"


def _public_params(params: dict[str, Any], *, viewer: Viewer) -> dict[str, Any]:
    """A job's source as clients see it: an upload's place in the data folder stays private, as
    do server paths but to admin keys, and the secrets of URLs to everyone."""
    params = {k: v for k, v in params.items() if k != "creator"}
    source = params.get("source")
    if source in SERVER_PATHS:
        if viewer.sees_paths:
            return {k: v for k, v in params.items() if k != "roots"}
        return {"source": source, **_root_of(params.get(SERVER_PATHS[source]), viewer.roots)}
    if source == "urls":
        # The list may be long: a count and the first few, without user-info or query strings
        # (signed URLs); the report names every URL, redacted, to whoever may read it.
        urls = [u for u in params.get("urls") or [] if isinstance(u, str)]
        return {"source": "urls", "count": len(urls), "urls": [redact_url(u) for u in urls[:URLS_SHOWN]]}
    if source != "archive":
        return params
    public = {"source": "archive", "filename": params.get("filename")}
    if params.get("manifest"):
        public["manifest"] = True
    return public


def _root_of(path: Any, roots: Mapping[str, Path]) -> dict[str, str]:
    """``{"root": name}`` of the import root ``path`` lies under (an IDX import gives its files)."""
    first = path[0] if isinstance(path, list) and path else path
    if isinstance(first, str):
        for name, root in roots.items():
            if Path(first).is_relative_to(root):
                return {"root": name}
    return {}


def _eta(info: JobInfo) -> float | None:
    r = info.record
    if r.state != "running" or not r.total or not info.images_per_second:
        return None
    return round(max(r.total - r.done, 0) / info.images_per_second, 1)
