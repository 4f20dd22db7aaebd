"""Near-duplicate groups: start a run (a job), page through its groups, resolve or reopen one."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, status
from pydantic import BeforeValidator

from app.api import job_access
from app.api.deps import ContextDep, TasksDep
from app.api.duplicates_schemas import (
    DuplicateGroupOut,
    DuplicateMemberOut,
    DuplicatePage,
    DuplicatePairOut,
    DuplicateRunOut,
    DuplicatesIn,
    ResolutionIn,
    ResolutionOut,
)
from app.api.parameters import _decimal
from app.api.presenters import image_urls
from app.api.schemas import JobAccepted
from app.context import AppContext
from app.core.cancel import CancelToken
from app.core.usertext import printable, servable
from app.duplicates import groups as duplicate_groups
from app.duplicates.groups import GroupInfo, GroupPage
from app.duplicates.job import KIND, check_run, find_duplicates

router = APIRouter(tags=["duplicates"])
API = "/api/v1"
MAX_GROUP_ID = 2**31 - 1  # group ids are 32-bit: a larger one can name no group
GroupId = Annotated[int, BeforeValidator(_decimal), Path(ge=1, le=MAX_GROUP_ID)]


@router.post(
    "/collections/{name}/duplicates", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted
)
def find(
    name: str, request: Request, ctx: ContextDep, tasks: TasksDep, body: DuplicatesIn | None = None
) -> JobAccepted:
    """Find the collection's near-duplicate groups in a background job: every pair of images whose
    served codes are within ``threshold`` (cosine), grouped; the groups replace the previous run's
    and keep the resolutions made on them. Poll ``status_url``, then read ``result_url``."""
    threshold = check_run(ctx, collection=name, threshold=body.threshold if body else None)
    ref: dict[str, str] = {}
    job_id = tasks.submit(
        kind=KIND,
        collection=name,
        params={"threshold": threshold},
        work=partial(_work, ctx, collection=name, threshold=threshold, ref=ref),
        creator=job_access.creator(request),
    )
    ref["job_id"] = job_id
    return JobAccepted(
        job_id=job_id,
        state="queued",
        status_url=f"{API}/jobs/{job_id}",
        result_url=f"{API}/collections/{name}/duplicates",
    )


def _work(
    ctx: AppContext, *, collection: str, threshold: float, ref: dict[str, str], token: CancelToken
) -> dict[str, Any]:
    # the job's id is known once submit returns, long before the run is stored
    return find_duplicates(
        ctx, collection=collection, threshold=threshold, token=token, job_id=lambda: ref.get("job_id")
    )


@router.get("/collections/{name}/duplicates", response_model=DuplicatePage)
def list_groups(
    name: str,
    ctx: ContextDep,
    status_: Annotated[str, Query(alias="status", pattern="^(open|resolved|all)$")] = "open",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DuplicatePage:
    """A page of the latest run's groups, largest first, each with its members (file and
    thumbnail URLs), its pairs with their scores and its resolution; ``run`` is null (and the page
    empty) before the first run."""
    found = duplicate_groups.list_groups(ctx, collection=name, status=status_, page=page, per_page=per_page)
    return _page_out(found)


@router.get("/collections/{name}/duplicates/{group_id}", response_model=DuplicateGroupOut)
def get_group(name: str, group_id: GroupId, ctx: ContextDep) -> DuplicateGroupOut:
    """One group of the latest run (404 for an earlier run's)."""
    return _group_out(duplicate_groups.get_group(ctx, collection=name, group_id=group_id))


@router.post("/collections/{name}/duplicates/{group_id}/resolution", response_model=DuplicateGroupOut)
def resolve(name: str, group_id: GroupId, body: ResolutionIn, ctx: ContextDep) -> DuplicateGroupOut:
    """Resolve a group: keep one image (the others are its duplicates) or mark the group "not
    duplicates". The resolution replaces any it overlaps and outlives re-runs; images that join
    the group later reopen it. 422 ``not_in_group`` when ``keep`` is not a member."""
    return _group_out(
        duplicate_groups.resolve_group(
            ctx, collection=name, group_id=group_id, action=body.action, keep=body.keep
        )
    )


@router.delete("/collections/{name}/duplicates/{group_id}/resolution", response_model=DuplicateGroupOut)
def reopen(name: str, group_id: GroupId, ctx: ContextDep) -> DuplicateGroupOut:
    """Clear the group's resolution and reopen it (its images leave every stored resolution)."""
    return _group_out(duplicate_groups.resolve_group(ctx, collection=name, group_id=group_id, action=None))


def _page_out(found: GroupPage) -> DuplicatePage:
    run = found.run
    return DuplicatePage(
        collection=found.collection,
        run=None if run is None else DuplicateRunOut.model_validate(run, from_attributes=True),
        status=found.status,  # type: ignore[arg-type]
        page=found.page,
        per_page=found.per_page,
        total=found.total,
        open=found.counts.get("open", 0),
        resolved=found.counts.get("resolved", 0),
        groups=[_group_out(group) for group in found.groups],
    )


def _group_out(group: GroupInfo) -> DuplicateGroupOut:
    resolution = group.resolution
    kept = resolution.keep if resolution is not None and group.status == "resolved" else None
    members = []
    for member in group.members:
        image_url, thumbnail_url = image_urls(member.image_id)
        meta = servable(member.meta)
        label = meta.get("label") if isinstance(meta, dict) else None
        role = None if kept is None else ("keep" if member.image_id == kept else "duplicate")
        members.append(
            DuplicateMemberOut(
                id=member.image_id,
                original_name=None if member.original_name is None else printable(member.original_name),
                label=None if label is None else str(label),
                metadata=meta if isinstance(meta, dict) else {},
                width=member.width,
                height=member.height,
                image_url=image_url,
                thumbnail_url=thumbnail_url,
                new=member.new,
                role=role,
            )
        )
    return DuplicateGroupOut(
        id=group.id,
        size=group.size,
        status=group.status,  # type: ignore[arg-type]
        reopened=group.reopened,
        resolution=None
        if resolution is None
        else ResolutionOut.model_validate(resolution, from_attributes=True),
        new_members=group.new_members,
        members=members,
        pairs=[DuplicatePairOut(left=p.left, right=p.right, score=round(p.score, 6)) for p in group.pairs],
    )
