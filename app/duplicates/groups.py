"""Reading a collection's duplicate groups (largest first, a page at a time) and resolving one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.catalog.collections import require_collection
from app.context import AppContext
from app.data.records import (
    DuplicateGroupRecord,
    DuplicateMemberRecord,
    DuplicatePairRecord,
    DuplicateResolutionRecord,
    DuplicateRunRecord,
    ImageRecord,
)
from app.duplicates import storage

STATUSES = ("open", "resolved", "all")


@dataclass(frozen=True)
class MemberInfo:
    image_id: int
    original_name: str | None
    meta: dict[str, Any]
    width: int
    height: int
    new: bool


@dataclass(frozen=True)
class PairInfo:
    left: int
    right: int
    score: float


@dataclass(frozen=True)
class ResolutionInfo:
    id: int
    action: str
    keep: int | None
    members: list[int]
    created_at: datetime


@dataclass(frozen=True)
class GroupInfo:
    id: int
    size: int
    status: str
    reopened: bool
    members: list[MemberInfo]
    pairs: list[PairInfo]
    resolution: ResolutionInfo | None

    @property
    def new_members(self) -> list[int]:
        return [m.image_id for m in self.members if m.new]


@dataclass(frozen=True)
class RunInfo:
    job_id: str | None
    embedder_version: str
    threshold: float
    images: int
    pairs: int
    groups: int
    truncated_rows: int
    method: str
    seconds: float
    created_at: datetime


@dataclass(frozen=True)
class GroupPage:
    collection: str
    status: str
    page: int
    per_page: int
    total: int  # groups with this status
    counts: dict[str, int]  # open and resolved groups of the run
    run: RunInfo | None  # None: the collection has had no duplicate run yet
    groups: list[GroupInfo]


def _run_info(run: DuplicateRunRecord) -> RunInfo:
    return RunInfo(
        job_id=run.job_id,
        embedder_version=run.embedder_version,
        threshold=run.threshold,
        images=run.images,
        pairs=run.pairs,
        groups=run.groups,
        truncated_rows=run.truncated_rows,
        method=run.method,
        seconds=run.seconds,
        created_at=run.created_at,
    )


def _sizes(run_id: int) -> Any:
    """Each group of the run with its members still stored (deleted images drop out), two or more."""
    return (
        select(DuplicateMemberRecord.group_id.label("group_id"), func.count().label("size"))
        .join(DuplicateGroupRecord, DuplicateGroupRecord.id == DuplicateMemberRecord.group_id)
        .where(DuplicateGroupRecord.run_id == run_id)
        .group_by(DuplicateMemberRecord.group_id)
        .having(func.count() >= 2)
        .subquery()
    )


def list_groups(ctx: AppContext, *, collection: str, status: str, page: int, per_page: int) -> GroupPage:
    """A page (from 1) of the latest run's groups with ``status`` (open, resolved or all), largest
    first; an empty page with ``run`` None before the first run."""
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        run = storage.latest_run(session, record.id)
        if run is None:
            return GroupPage(collection, status, page, per_page, 0, {"open": 0, "resolved": 0}, None, [])
        sizes = _sizes(run.id)
        counted = (
            select(DuplicateGroupRecord.status, func.count())
            .join(sizes, sizes.c.group_id == DuplicateGroupRecord.id)
            .group_by(DuplicateGroupRecord.status)
        )
        counts = {"open": 0, "resolved": 0} | {s: int(n) for s, n in session.execute(counted)}
        query = select(DuplicateGroupRecord, sizes.c.size).join(
            sizes, sizes.c.group_id == DuplicateGroupRecord.id
        )
        if status != "all":
            query = query.where(DuplicateGroupRecord.status == status)
        rows = session.execute(
            query.order_by(sizes.c.size.desc(), DuplicateGroupRecord.rank, DuplicateGroupRecord.id)
            .offset((page - 1) * per_page)
            .limit(per_page)
        ).all()
        total = counts[status] if status != "all" else sum(counts.values())
        groups = _details(session, [(group, int(size)) for group, size in rows])
        return GroupPage(collection, status, page, per_page, total, counts, _run_info(run), groups)


def get_group(ctx: AppContext, *, collection: str, group_id: int) -> GroupInfo:
    with ctx.db.session() as session:
        record = require_collection(session, collection)
        group = storage.require_group(session, collection_id=record.id, group_id=group_id)
        return _details(session, [(group, len(storage.group_members(session, group_id)))])[0]


def resolve_group(
    ctx: AppContext, *, collection: str, group_id: int, action: str | None, keep: int | None = None
) -> GroupInfo:
    """Resolve the group: ``keep`` (image ``keep`` stays, the others are its duplicates) or
    ``not_duplicates``; ``action`` None clears its resolution and reopens it. A new resolution
    replaces those it overlaps; later runs keep it (app/duplicates/grouping.py)."""
    ctx.store.gate.check()  # 503 read_only
    with ctx.db.transaction() as session:
        record = require_collection(session, collection)
        storage.set_resolution(session, collection_id=record.id, group_id=group_id, action=action, keep=keep)
    return get_group(ctx, collection=collection, group_id=group_id)


def _details(session: Session, groups: list[tuple[DuplicateGroupRecord, int]]) -> list[GroupInfo]:
    """Members (with their image's name, metadata and size), pairs and resolution of ``groups``."""
    ids = [group.id for group, _ in groups]
    members: dict[int, list[MemberInfo]] = {i: [] for i in ids}
    pairs: dict[int, list[PairInfo]] = {i: [] for i in ids}
    for group_id, image_id, new, name, meta, width, height in session.execute(
        select(
            DuplicateMemberRecord.group_id,
            DuplicateMemberRecord.image_id,
            DuplicateMemberRecord.new,
            ImageRecord.original_name,
            ImageRecord.meta,
            ImageRecord.width,
            ImageRecord.height,
        )
        .join(ImageRecord, ImageRecord.id == DuplicateMemberRecord.image_id)
        .where(DuplicateMemberRecord.group_id.in_(ids))
        .order_by(DuplicateMemberRecord.image_id)
    ):
        members[group_id].append(MemberInfo(image_id, name, meta or {}, width, height, bool(new)))
    for group_id, left, right, score in session.execute(
        select(
            DuplicatePairRecord.group_id,
            DuplicatePairRecord.left_id,
            DuplicatePairRecord.right_id,
            DuplicatePairRecord.score,
        )
        .where(DuplicatePairRecord.group_id.in_(ids))
        .order_by(DuplicatePairRecord.score.desc(), DuplicatePairRecord.left_id, DuplicatePairRecord.right_id)
    ):
        pairs[group_id].append(PairInfo(left, right, float(score)))
    wanted = {group.resolution_id for group, _ in groups if group.resolution_id is not None}
    resolutions = {
        r.id: ResolutionInfo(r.id, r.action, r.keep_image_id, list(r.members), r.created_at)
        for r in session.scalars(
            select(DuplicateResolutionRecord).where(DuplicateResolutionRecord.id.in_(wanted))
        )
    }
    return [
        GroupInfo(
            id=group.id,
            size=size,
            status=group.status,
            reopened=group.reopened,
            members=members[group.id],
            pairs=pairs[group.id],
            resolution=resolutions.get(group.resolution_id) if group.resolution_id else None,
        )
        for group, size in groups
    ]
