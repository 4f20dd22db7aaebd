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
    eta_seconds: float | None = Field(
        None, description="while running: seconds left at the current rate (None when unknown)"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    jobs: list[JobOut]


class CollectionHealth(BaseModel):
    name: str
    images: int
    indexed: int


class Health(BaseModel):
    status: str
    version: str
    device: str
    collections: list[CollectionHealth]


class LabelCount(BaseModel):
    label: str
    count: int


class LabelList(BaseModel):
    collection: str
    total: int = Field(description="images in the collection")
    distinct: int = Field(description="distinct labels (the list may show fewer)")
    unlabelled: int
    labels: list[LabelCount] = Field(description="most common first")


class PrecisionRecallCurve(BaseModel):
    recall: list[float]
    precision: list[float] = Field(description="interpolated precision, averaged over queries")


class EvaluationRow(BaseModel):
    embedder: str
    queries: int
    database: int
    p_at_10: float
    map_at_10: float
    map_all: float
    pr_curve: PrecisionRecallCurve | None = None
    seconds: float


class EvaluationStart(BaseModel):
    queries: str = Field("mnist:test", examples=["mnist:test"])
    limit: int | None = Field(None, ge=1, description="use only the first N queries (None: all)")
    compare: list[str] = Field(
        default_factory=list, max_length=4, examples=[["pixels"]], description="pixels or checkpoint:ID"
    )


class EvaluationRun(BaseModel):
    queries: str
    limit: int | None
    compare: list[str]


class EvaluationRunning(EvaluationRun):
    started_at: datetime


class EvaluationFailure(EvaluationRun):
    failed_at: datetime
    error: str


class EvaluationResult(EvaluationRun):
    computed_at: datetime
    seconds: float
    results: list[EvaluationRow]


class CompareChoice(BaseModel):
    spec: str
    description: str


class EvaluationOut(BaseModel):
    collection: str
    embedder_version: str | None
    query_sets: list[str]
    compare_choices: list[CompareChoice]
    running: list[EvaluationRunning]
    latest: EvaluationResult | None = Field(description="the newest result for the served embedder")
    failure: EvaluationFailure | None = Field(description="the last run, when it failed after `latest`")


class MapPointOut(BaseModel):
    id: int
    x: float
    y: float
    label: str | None


class MapOut(BaseModel):
    collection: str
    embedder_version: str
    method: str
    methods: list[str] = Field(description="methods available on this server (umap needs umap-learn)")
    sample: int = Field(description="points drawn (evenly spread over the collection by id)")
    total: int = Field(description="images with a code in the collection")
    explained_variance: list[float] | None
    points: list[MapPointOut]


class CompareSide(BaseModel):
    embedder: str
    source: str = Field(description="'stored codes' or 'computed for this comparison'")
    hits: list[HitOut]
    timings_ms: dict[str, float]


class CompareResponse(BaseModel):
    collection: str
    k: int
    query_image_id: int | None
    sample: int = Field(description="images both sides searched (evenly spread over the collection)")
    total: int
    sides: list[CompareSide]
