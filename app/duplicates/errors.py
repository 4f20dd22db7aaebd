"""The near-duplicate room's problems (rendered as problem+json like every CbirError)."""

from __future__ import annotations

from app.core.errors import InvalidRequest, NotFound


class GroupNotFound(NotFound):
    code, title = "duplicate_group_not_found", "Duplicate group not found"


class NotInGroup(InvalidRequest):
    code, title = "not_in_group", "Image not in the group"
