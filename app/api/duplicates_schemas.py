"""Request and response models of near-duplicate groups (routes_duplicates.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from app.api.parameters import MAX_ID
from app.api.schemas import UtcDateTime


class DuplicatesIn(BaseModel):
    threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        examples=[0.9],
        description="cosine similarity of the served codes at or above which two images are near "
        "duplicates; default: the collection's embedder's measured default",
    )


class ResolutionIn(BaseModel):
    """``keep``: image ``keep`` stays and the group's other images are its duplicates;
    ``not_duplicates``: the images only look alike."""

    action: Literal["keep", "not_duplicates"]
    keep: int | None = Field(None, ge=1, le=MAX_ID, description="with action keep: the image kept")

    @model_validator(mode="after")
    def _keep_goes_with_its_action(self) -> ResolutionIn:
        if (self.action == "keep") != (self.keep is not None):
            raise ValueError('"keep" (an image id of the group) is given with action "keep" and only then')
        return self


class DuplicateMemberOut(BaseModel):
    id: int
    original_name: str | None
    label: str | None
    metadata: dict[str, object]
    width: int
    height: int
    image_url: str
    thumbnail_url: str
    new: bool = Field(description="joined the group after the resolution it outgrew")
    role: Literal["keep", "duplicate"] | None = Field(
        description="in a group resolved with keep: the image kept, or a duplicate of it"
    )


class DuplicatePairOut(BaseModel):
    left: int
    right: int
    score: float = Field(description="cosine similarity of the two images' served codes")


class ResolutionOut(BaseModel):
    id: int
    action: Literal["keep", "not_duplicates"]
    keep: int | None
    members: list[int] = Field(description="the images the resolution was made on (deleted ones drop out)")
    created_at: UtcDateTime


class DuplicateGroupOut(BaseModel):
    id: int
    size: int
    status: Literal["open", "resolved"]
    reopened: bool = Field(
        description="open again: images joined since it was resolved, or resolved groups merged"
    )
    resolution: ResolutionOut | None = Field(
        description="the resolution that covers it, or (reopened) the one it outgrew"
    )
    new_members: list[int]
    members: list[DuplicateMemberOut]
    pairs: list[DuplicatePairOut] = Field(description="its pairs within the threshold, best first")


class DuplicateRunOut(BaseModel):
    job_id: str | None
    embedder_version: str
    threshold: float
    images: int
    pairs: int
    groups: int
    truncated_rows: int = Field(
        description="images with more near neighbours than the per-image cap (their best were kept)"
    )
    method: str = Field(description="exact, or ivf (an inverted-file k-NN graph) on large collections")
    seconds: float
    created_at: UtcDateTime


class DuplicatePage(BaseModel):
    collection: str
    run: DuplicateRunOut | None = Field(description="null: no duplicate run yet (POST to start one)")
    status: Literal["open", "resolved", "all"]
    page: int
    per_page: int
    total: int = Field(description="groups with this status")
    open: int
    resolved: int
    groups: list[DuplicateGroupOut]
