"""Request and response models of evaluation: quality figures, evaluation runs, compare choices."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from app.api.schemas import UtcDateTime


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


class EvaluateIn(BaseModel):
    """Either ``queries`` (a labelled query set) or ``groundtruth`` ({query file: [relevant files]},
    each query image of the collection ranked against the rest of it)."""

    queries: str | None = Field(None, examples=["mnist:test"])
    groundtruth: dict[str, list[str]] | None = Field(None, max_length=100_000)
    embedders: list[str] = Field(default_factory=list, max_length=8, description="embedder specs")
    whiten: list[Annotated[int, Field(ge=0, le=4096)]] = Field(
        default_factory=list,
        max_length=8,
        description="0: off; empty (with no embedders): the collection as served, whitened if it "
        "serves a whitening",
    )
    qe: list[Annotated[int, Field(ge=0, le=20)]] = Field(
        default_factory=list, max_length=8, description="0: off; empty: the collection's search option"
    )
    qe_alpha: float | None = Field(None, ge=0, le=10, description="default: the collection's (3)")
    limit: int | None = Field(None, ge=1)


class EvaluateRow(BaseModel):
    embedder: str
    whiten: int = 0
    qe: int = 0
    queries: int
    database: int
    p_at_10: float
    map_at_10: float
    map_all: float
    embed_img_s: float | None = None
    seconds: float


class EvaluateOut(BaseModel):
    collection: str
    results: list[EvaluateRow]


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
    started_at: UtcDateTime


class EvaluationFailure(EvaluationRun):
    failed_at: UtcDateTime
    error: str


class EvaluationResult(EvaluationRun):
    computed_at: UtcDateTime
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
