"""Shape service results into response models."""

from __future__ import annotations

from typing import Any

from app.api.schemas import (
    CollectionOut,
    CompareResponse,
    CompareSide,
    EvaluationOut,
    HitOut,
    ImageOut,
    JobError,
    JobOut,
    MapOut,
    MapPointOut,
    SearchResponse,
)
from app.records import ImageRecord
from app.services.collections import CollectionInfo
from app.services.compare import Comparison
from app.services.evaluation import EvaluationStatus
from app.services.jobs import JobInfo
from app.services.maps import CollectionMap
from app.services.search import SearchResult

API = "/api/v1"


def image_urls(image_id: int) -> tuple[str, str]:
    return f"{API}/images/{image_id}/file", f"{API}/images/{image_id}/thumbnail"


def collection_out(info: CollectionInfo) -> CollectionOut:
    return CollectionOut.model_validate(info, from_attributes=True)


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
        original_name=record.original_name,
        metadata=record.meta or {},
        created_at=record.created_at,
        image_url=image_url,
        thumbnail_url=thumbnail_url,
    )


def hits_out(result: SearchResult) -> list[HitOut]:
    hits = []
    for hit in result.hits:
        image_url, thumbnail_url = image_urls(hit.image_id)
        meta = hit.record.meta or {}
        label = meta.get("label")
        hits.append(
            HitOut(
                rank=hit.rank,
                id=hit.image_id,
                score=round(hit.score, 6),
                label=None if label is None else str(label),
                metadata=meta,
                original_name=hit.record.original_name,
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


def job_out(info: JobInfo, *, max_errors: int | None = None) -> JobOut:
    """``max_errors`` keeps only the first per-item errors (the list view; ``failed`` counts all)."""
    r = info.record
    return JobOut(
        id=r.id,
        kind=r.kind,
        collection=info.collection,
        state=r.state,
        params=_public_params(r.params or {}),
        total=r.total,
        done=r.done,
        added=r.added,
        duplicates=r.duplicates,
        failed=r.failed,
        errors=[JobError(**e) for e in (r.errors or [])[:max_errors]],
        error=r.error,
        resumes=r.resumes or 0,
        images_per_second=info.images_per_second,
        eta_seconds=_eta(info),
        created_at=r.created_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


URLS_SHOWN = 5


def _public_params(params: dict[str, Any]) -> dict[str, Any]:
    """A job's source as clients see it: an upload's place in the data folder stays private."""
    if params.get("source") == "manifest":
        return {k: v for k, v in params.items() if k != "roots"}
    if params.get("source") == "urls":
        # The list may be long and its query strings may hold tokens (signed URLs): a count and
        # the first few without their queries; the report names every URL to whoever may read it.
        urls = [u for u in params.get("urls") or [] if isinstance(u, str)]
        shown = [u.split("?", 1)[0].split("#", 1)[0] for u in urls[:URLS_SHOWN]]
        return {"source": "urls", "count": len(urls), "urls": shown}
    if params.get("source") != "archive":
        return params
    public = {"source": "archive", "filename": params.get("filename")}
    if params.get("manifest"):
        public["manifest"] = True
    return public


def _eta(info: JobInfo) -> float | None:
    r = info.record
    if r.state != "running" or not r.total or not info.images_per_second:
        return None
    return round(max(r.total - r.done, 0) / info.images_per_second, 1)
