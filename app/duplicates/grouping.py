"""Groups from pairs, and what the stored resolutions say about each group (pure functions).

A resolution is kept with the member set it was made on. A group of a later run is:

- ``resolved`` by a resolution whose members include every member of the group (images deleted
  since simply drop out), a ``keep`` one only while its kept image is still in the group;
- ``open`` and ``reopened`` when it overlaps resolutions without one of them covering it: new
  images joined a resolved group, two resolved groups merged, or the kept image left. It names the
  latest of those resolutions, and ``new``: its members that none of them covered;
- ``open`` when no resolution touches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from index.pairs import Pairs, components

ACTIONS = ("keep", "not_duplicates")


@dataclass(frozen=True)
class Resolution:
    id: int
    action: str  # one of ACTIONS
    keep: int | None  # the image kept, for action "keep"
    members: frozenset[int]


@dataclass(frozen=True)
class Verdict:
    status: str  # "open" or "resolved"
    resolution_id: int | None
    reopened: bool
    new: frozenset[int]


OPEN = Verdict("open", None, False, frozenset())


@dataclass(frozen=True)
class Grouped:
    """The groups of one run as arrays: ``members`` (m,) image ids and ``member_group`` (m,) their
    group, sorted by group then id; ``pair_group`` (p,) the group of each of ``pairs``. Groups are
    numbered 0, 1, ... largest first."""

    members: np.ndarray
    member_group: np.ndarray
    pairs: Pairs
    pair_group: np.ndarray

    @property
    def count(self) -> int:
        return int(self.member_group.max()) + 1 if len(self.member_group) else 0

    def member_sets(self) -> list[frozenset[int]]:
        bounds = np.searchsorted(self.member_group, np.arange(self.count + 1))
        return [frozenset(self.members[bounds[g] : bounds[g + 1]].tolist()) for g in range(self.count)]


def group_pairs(pairs: Pairs) -> Grouped:
    """The connected components of ``pairs``, each with its members and its pairs."""
    nodes, labels = components(pairs)
    order = np.lexsort((nodes, labels))
    members, member_group = nodes[order], labels[order]
    pair_group = labels[np.searchsorted(nodes, pairs.left)] if len(pairs) else np.zeros(0, np.int64)
    return Grouped(members=members, member_group=member_group, pairs=pairs, pair_group=pair_group)


def by_image(resolutions: Iterable[Resolution]) -> dict[int, list[Resolution]]:
    """Image id -> the resolutions made on a set that holds it."""
    index: dict[int, list[Resolution]] = {}
    for resolution in resolutions:
        for image_id in resolution.members:
            index.setdefault(image_id, []).append(resolution)
    return index


def touching(members: Iterable[int], index: dict[int, list[Resolution]]) -> list[Resolution]:
    """The resolutions that share an image with ``members``, latest first."""
    found = {r.id: r for image_id in members for r in index.get(image_id, ())}
    return sorted(found.values(), key=lambda r: -r.id)


def verdict(members: frozenset[int], resolutions: Sequence[Resolution]) -> Verdict:
    """What ``resolutions`` (those touching the group, latest first) make of a group of ``members``."""
    if not resolutions:
        return OPEN
    for resolution in resolutions:
        covers = members <= resolution.members
        if covers and (resolution.action != "keep" or resolution.keep in members):
            return Verdict("resolved", resolution.id, False, frozenset())
    covered = frozenset().union(*(r.members for r in resolutions))
    return Verdict("open", resolutions[0].id, True, members - covered)


def released(resolution: Resolution, members: frozenset[int]) -> Resolution | None:
    """``resolution`` once ``members`` (a group resolved or reopened anew) are taken out of it; None
    when nothing of it is left to hold (under two images, or its kept image taken out)."""
    left = resolution.members - members
    if len(left) < 2 or (resolution.action == "keep" and resolution.keep not in left):
        return None
    return Resolution(resolution.id, resolution.action, resolution.keep, left)
