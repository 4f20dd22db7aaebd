"""The duplicate tables: a run's groups replacing the previous run's, and resolutions made, replaced
or cleared, each in one transaction (app/data/records.py: Duplicate*Record)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from app.data.records import (
    CollectionRecord,
    DuplicateGroupRecord,
    DuplicateMemberRecord,
    DuplicatePairRecord,
    DuplicateResolutionRecord,
    DuplicateRunRecord,
    ImageRecord,
)
from app.data.vector_rows import CHUNK
from app.duplicates.errors import GroupNotFound, NotInGroup
from app.duplicates.grouping import (
    Grouped,
    Resolution,
    Verdict,
    by_image,
    group_pairs,
    released,
    touching,
    verdict,
)
from index.pairs import Pairs

ROWS = 10_000  # rows per executemany


@dataclass(frozen=True)
class RunFacts:
    """What a run measured, stored with its groups."""

    job_id: str | None
    embedder_version: str
    threshold: float
    images: int
    truncated_rows: int
    method: str
    seconds: float


def resolutions_of(session: Session, collection_id: int) -> list[Resolution]:
    rows = session.execute(
        select(
            DuplicateResolutionRecord.id,
            DuplicateResolutionRecord.action,
            DuplicateResolutionRecord.keep_image_id,
            DuplicateResolutionRecord.members,
        ).where(DuplicateResolutionRecord.collection_id == collection_id)
    ).all()
    return [Resolution(int(i), a, k, frozenset(int(m) for m in members)) for i, a, k, members in rows]


def _existing(session: Session, collection_id: int, ids: np.ndarray) -> np.ndarray:
    """Those of ``ids`` (ascending) still images of the collection."""
    found: list[int] = []
    for start in range(0, len(ids), CHUNK):
        chunk = [int(i) for i in ids[start : start + CHUNK]]
        found.extend(
            session.scalars(
                select(ImageRecord.id).where(
                    ImageRecord.collection_id == collection_id, ImageRecord.id.in_(chunk)
                )
            )
        )
    return np.sort(np.asarray(found, dtype=np.int64))


def _without_deleted(session: Session, collection_id: int, pairs: Pairs) -> Pairs:
    """``pairs`` less those with an image deleted since the codes were read."""
    nodes = np.unique(np.concatenate([pairs.left, pairs.right]))
    kept = _existing(session, collection_id, nodes)
    if len(kept) == len(nodes):
        return pairs
    keep = np.isin(pairs.left, kept) & np.isin(pairs.right, kept)
    return Pairs(pairs.left[keep], pairs.right[keep], pairs.score[keep], pairs.truncated_rows, pairs.method)


def _insert(
    session: Session,
    table: Any,
    rows: Callable[[int, int], list[dict[str, Any]]],
    count: int,
    check: Callable[[], None],
) -> None:
    """Insert ``count`` rows made ``ROWS`` at a time by ``rows(start, stop)``: never all at once."""
    for start in range(0, count, ROWS):
        check()
        session.execute(insert(table), rows(start, min(count, start + ROWS)))


def save_run(
    session: Session,
    *,
    collection_id: int,
    facts: RunFacts,
    pairs: Pairs,
    check: Callable[[], None],
) -> dict[str, int]:
    """Replace the collection's run by this one (in the caller's transaction): its groups with their
    members and pairs, each judged against the stored resolutions. Counts of groups by outcome."""
    # One saver at a time per collection on PostgreSQL (SQLite has a single writer anyway).
    session.execute(select(CollectionRecord.id).where(CollectionRecord.id == collection_id).with_for_update())
    pairs = _without_deleted(session, collection_id, pairs) if len(pairs) else pairs
    grouped = group_pairs(pairs)
    verdicts = _verdicts(grouped, resolutions_of(session, collection_id))
    session.execute(delete(DuplicateRunRecord).where(DuplicateRunRecord.collection_id == collection_id))
    run_id = session.scalar(
        insert(DuplicateRunRecord)
        .values(
            collection_id=collection_id,
            pairs=len(pairs),
            groups=grouped.count,
            **vars(facts),
        )
        .returning(DuplicateRunRecord.id)
    )
    group_ids: list[int] = []
    rows = [
        {
            "run_id": run_id,
            "collection_id": collection_id,
            "rank": rank,
            "status": v.status,
            "reopened": v.reopened,
            "resolution_id": v.resolution_id,
        }
        for rank, v in enumerate(verdicts)
    ]
    for start in range(0, len(rows), ROWS):
        check()
        group_ids.extend(
            session.scalars(
                insert(DuplicateGroupRecord).returning(DuplicateGroupRecord.id, sort_by_parameter_order=True),
                rows[start : start + ROWS],
            )
        )
    ids = np.asarray(group_ids, dtype=np.int64)

    def member_rows(start: int, stop: int) -> list[dict[str, Any]]:
        members, groups = grouped.members[start:stop].tolist(), grouped.member_group[start:stop].tolist()
        return [
            {"group_id": int(ids[g]), "image_id": i, "new": i in verdicts[g].new}
            for i, g in zip(members, groups, strict=True)
        ]

    def pair_rows(start: int, stop: int) -> list[dict[str, Any]]:
        columns = (pairs.left, pairs.right, pairs.score, grouped.pair_group)
        return [
            {"group_id": int(ids[g]), "left_id": a, "right_id": b, "score": s}
            for a, b, s, g in zip(*(c[start:stop].tolist() for c in columns), strict=True)
        ]

    _insert(session, DuplicateMemberRecord, member_rows, len(grouped.members), check)
    _insert(session, DuplicatePairRecord, pair_rows, len(pairs), check)
    counts = {"groups": grouped.count, "open": 0, "resolved": 0, "reopened": 0}
    for v in verdicts:
        counts[v.status] += 1
        counts["reopened"] += v.reopened
    return counts


def _verdicts(grouped: Grouped, resolutions: list[Resolution]) -> list[Verdict]:
    """The verdict of each group; only those that touch a resolved image are looked at closely."""
    open_ = Verdict("open", None, False, frozenset())
    verdicts = [open_] * grouped.count
    if not resolutions:
        return verdicts
    index = by_image(resolutions)
    resolved_ids = np.fromiter(index, dtype=np.int64, count=len(index))
    sets = grouped.member_sets()
    for g in np.unique(grouped.member_group[np.isin(grouped.members, resolved_ids)]).tolist():
        verdicts[g] = verdict(sets[g], touching(sets[g], index))
    return verdicts


# -- resolutions ------------------------------------------------------------------------------
def latest_run(session: Session, collection_id: int) -> DuplicateRunRecord | None:
    return session.scalar(select(DuplicateRunRecord).where(DuplicateRunRecord.collection_id == collection_id))


def group_members(session: Session, group_id: int) -> frozenset[int]:
    return frozenset(
        int(i)
        for i in session.scalars(
            select(DuplicateMemberRecord.image_id).where(DuplicateMemberRecord.group_id == group_id)
        )
    )


def require_group(session: Session, *, collection_id: int, group_id: int) -> DuplicateGroupRecord:
    """The group of the collection's latest run with this id (404 otherwise: an earlier run's,
    another collection's, or one whose images were deleted down to fewer than two)."""
    run = latest_run(session, collection_id)
    group = session.get(DuplicateGroupRecord, group_id) if run is not None else None
    if group is None or run is None or group.run_id != run.id or len(group_members(session, group_id)) < 2:
        raise GroupNotFound(f"the latest duplicate run of this collection has no group {group_id}")
    return group


def set_resolution(
    session: Session, *, collection_id: int, group_id: int, action: str | None, keep: int | None
) -> None:
    """Resolve the group (``action`` keep or not_duplicates), replacing the resolutions it overlaps,
    or with ``action`` None clear them and reopen it; the run's other groups that those
    resolutions covered are judged again."""
    group = require_group(session, collection_id=collection_id, group_id=group_id)
    members = group_members(session, group_id)
    if action == "keep" and keep not in members:
        raise NotInGroup(f"image {keep} is not a member of group {group_id}: keep one of {sorted(members)}")
    changed = touching(members, by_image(resolutions_of(session, collection_id)))
    linked = session.scalars(
        select(DuplicateGroupRecord.id).where(
            DuplicateGroupRecord.run_id == group.run_id,
            DuplicateGroupRecord.id != group_id,
            DuplicateGroupRecord.resolution_id.in_([r.id for r in changed]),
        )
    ).all()
    _release(session, changed, members)
    new_id = None
    if action is not None:
        new_id = session.scalar(
            insert(DuplicateResolutionRecord)
            .values(
                collection_id=collection_id,
                action=action,
                keep_image_id=keep if action == "keep" else None,
                members=sorted(members),
            )
            .returning(DuplicateResolutionRecord.id)
        )
    session.execute(
        update(DuplicateGroupRecord)
        .where(DuplicateGroupRecord.id == group_id)
        .values(status="resolved" if new_id else "open", resolution_id=new_id, reopened=False)
    )
    session.execute(
        update(DuplicateMemberRecord).where(DuplicateMemberRecord.group_id == group_id).values(new=False)
    )
    _judge_again(session, collection_id, group_ids=linked)


def _release(session: Session, changed: list[Resolution], members: frozenset[int]) -> None:
    """Take ``members`` out of the resolutions ``changed`` that hold some of them (deleting those
    with nothing left to hold)."""
    for resolution in changed:
        rest = released(resolution, members)
        if rest is None:
            session.execute(
                delete(DuplicateResolutionRecord).where(DuplicateResolutionRecord.id == resolution.id)
            )
        else:
            session.execute(
                update(DuplicateResolutionRecord)
                .where(DuplicateResolutionRecord.id == resolution.id)
                .values(members=sorted(rest.members))
            )


def _judge_again(session: Session, collection_id: int, *, group_ids: Iterable[int]) -> None:
    """Judge again groups whose resolution was just changed or deleted."""
    index = by_image(resolutions_of(session, collection_id))
    for group_id in group_ids:
        members = group_members(session, group_id)
        found = verdict(members, touching(members, index))
        session.execute(
            update(DuplicateGroupRecord)
            .where(DuplicateGroupRecord.id == group_id)
            .values(status=found.status, resolution_id=found.resolution_id, reopened=found.reopened)
        )
        session.execute(
            update(DuplicateMemberRecord)
            .where(DuplicateMemberRecord.group_id == group_id)
            .values(new=DuplicateMemberRecord.image_id.in_(sorted(found.new)) if found.new else False)
        )
