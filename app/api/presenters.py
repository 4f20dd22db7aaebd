"""Shape service results into response models."""

from __future__ import annotations

from app.api.schemas import CollectionOut, HitOut, ImageOut, JobError, JobOut, SearchResponse
from app.records import ImageRecord
from app.services.collections import CollectionInfo
from app.services.jobs import JobInfo
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


def search_out(result: SearchResult) -> SearchResponse:
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
    return SearchResponse(
        collection=result.collection,
        k=result.k,
        query_image_id=result.query_image_id,
        hits=hits,
        timings_ms=result.timings_ms,
    )


def job_out(info: JobInfo) -> JobOut:
    r = info.record
    return JobOut(
        id=r.id,
        kind=r.kind,
        collection=info.collection,
        state=r.state,
        params=r.params or {},
        total=r.total,
        done=r.done,
        added=r.added,
        duplicates=r.duplicates,
        failed=r.failed,
        errors=[JobError(**e) for e in (r.errors or [])],
        error=r.error,
        images_per_second=info.images_per_second,
        created_at=r.created_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )
