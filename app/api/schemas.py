"""Response and request models, named by role."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str


class CollectionCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$", examples=["holidays"])
    embedder: str = Field("cdae", examples=["cdae", "pixels"])


class CheckpointOut(BaseModel):
    id: int
    version: str
    sha256: str
    created_at: str
    config: dict[str, Any]
    metrics: dict[str, Any]


class CollectionOut(BaseModel):
    name: str
    embedder: str
    embedder_version: str | None
    dim: int | None
    checkpoint: CheckpointOut | None
    image_count: int
    embedded_count: int
    index_size: int
    index_factory: str
    ready: bool = Field(description="True when the collection can be searched")
    created_at: datetime


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class ImageOut(BaseModel):
    id: int
    collection: str
    sha256: str
    format: str
    width: int
    height: int
    byte_size: int
    original_name: str | None
    metadata: dict[str, Any]
    created_at: datetime
    image_url: str
    thumbnail_url: str


class ImageCreated(BaseModel):
    id: int
    created: bool
    image: ImageOut


class HitOut(BaseModel):
    rank: int
    id: int
    score: float
    label: str | None
    metadata: dict[str, Any]
    original_name: str | None
    image_url: str
    thumbnail_url: str


class SearchResponse(BaseModel):
    collection: str
    k: int
    query_image_id: int | None = None
    hits: list[HitOut]
    timings_ms: dict[str, float] = Field(description="decode, embed, search, fetch and total")


class DatasetImport(BaseModel):
    dataset: str = Field(examples=["mnist"])
    split: str = Field("train", examples=["train", "test"])


class JobAccepted(BaseModel):
    job_id: str
    state: str
    status_url: str


class JobError(BaseModel):
    item: str | None
    code: str | None
    detail: str | None


class JobOut(BaseModel):
    id: str
    kind: str
    collection: str | None
    state: str
    params: dict[str, Any]
    total: int | None
    done: int
    added: int
    duplicates: int
    failed: int
    errors: list[JobError]
    error: str | None
    images_per_second: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class CollectionHealth(BaseModel):
    name: str
    images: int
    indexed: int


class Health(BaseModel):
    status: str
    version: str
    device: str
    collections: list[CollectionHealth]
