"""What stored resolutions make of the groups of a later run (app/duplicates/grouping.py)."""

from __future__ import annotations

import numpy as np

from app.duplicates.grouping import Resolution, by_image, group_pairs, released, touching, verdict
from index.pairs import Pairs


def judge(members: set[int], *resolutions: Resolution):
    return verdict(frozenset(members), touching(members, by_image(resolutions)))


KEEP_1 = Resolution(1, "keep", 10, frozenset({10, 11, 12}))
APART_2 = Resolution(2, "not_duplicates", None, frozenset({20, 21}))


def test_a_group_covered_by_a_resolution_stays_resolved_even_smaller() -> None:
    assert judge({10, 11, 12}, KEEP_1).status == "resolved"
    assert judge({10, 12}, KEEP_1).resolution_id == 1  # 11 deleted: it drops out
    assert judge({20, 21}, KEEP_1, APART_2).resolution_id == 2


def test_new_images_reopen_a_resolved_group_and_are_named() -> None:
    found = judge({10, 11, 12, 13}, KEEP_1)
    assert (found.status, found.reopened, found.resolution_id, found.new) == ("open", True, 1, {13})


def test_merged_groups_and_a_kept_image_gone_reopen() -> None:
    merged = judge({10, 11, 12, 20, 21}, KEEP_1, APART_2)
    assert merged.status == "open" and merged.reopened and merged.new == frozenset()
    assert merged.resolution_id == 2  # the latest of the two
    without_kept = judge({11, 12}, KEEP_1)
    assert without_kept.status == "open" and without_kept.reopened


def test_untouched_groups_are_open() -> None:
    found = judge({30, 31}, KEEP_1, APART_2)
    assert (found.status, found.reopened, found.resolution_id) == ("open", False, None)


def test_releasing_members_shrinks_or_drops_a_resolution() -> None:
    assert released(KEEP_1, frozenset({12})) == Resolution(1, "keep", 10, frozenset({10, 11}))
    assert released(KEEP_1, frozenset({10})) is None  # the kept image left
    assert released(APART_2, frozenset({21})) is None  # one image is no group


def test_groups_of_pairs_carry_their_members_and_pairs() -> None:
    pairs = Pairs(
        left=np.array([1, 2, 7], np.int64),
        right=np.array([2, 3, 9], np.int64),
        score=np.array([0.95, 0.93, 0.99], np.float32),
    )
    grouped = group_pairs(pairs)
    assert grouped.count == 2
    assert grouped.member_sets() == [frozenset({1, 2, 3}), frozenset({7, 9})]
    assert grouped.pair_group.tolist() == [0, 0, 1]
