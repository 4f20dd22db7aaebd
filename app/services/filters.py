"""Filters by label or metadata (``label=7``, ``meta=split:train``) for browse, search and similar.

Values are compared as text with the stored metadata value (a number matches its decimal text)
and only ever reach SQL as bound parameters: the key through SQLAlchemy's JSON path parameter,
the value as a bound comparison value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest
from app.records import ImageRecord

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_VALUE_CHARS = 256
MAX_CONDITIONS = 8


@dataclass(frozen=True)
class ImageFilter:
    """Metadata ``key == value`` conditions, all of which must hold (``label`` is one key)."""

    conditions: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def describe(self) -> dict[str, str]:
        return dict(self.conditions)


def parse_filter(*, label: str | None = None, meta: Sequence[str] = ()) -> ImageFilter:
    """Validate ``label`` and ``meta`` (each ``KEY:VALUE``) into a filter; InvalidRequest if bad."""
    conditions: list[tuple[str, str]] = []
    if label is not None:
        conditions.append(("label", _value(label, "label")))
    for item in meta:
        key, sep, value = item.partition(":")
        if not sep:
            raise InvalidRequest(f"meta filter {item[:80]!r} must be KEY:VALUE, e.g. split:train")
        if not KEY_PATTERN.match(key):
            raise InvalidRequest(
                f"metadata key {key[:80]!r} is invalid: use 1-64 letters, digits, '_', '.' or '-'"
            )
        conditions.append((key, _value(value, f"meta {key}")))
    if len(conditions) > MAX_CONDITIONS:
        raise InvalidRequest(f"at most {MAX_CONDITIONS} filter conditions, got {len(conditions)}")
    return ImageFilter(tuple(conditions))


def _value(value: str, what: str) -> str:
    if len(value) > MAX_VALUE_CHARS:
        raise InvalidRequest(f"the {what} filter value is longer than {MAX_VALUE_CHARS} characters")
    return value


def meta_text(key: str) -> ColumnElement[Any]:
    """SQL expression: the metadata value under ``key`` as text (NULL when absent)."""
    # as_string() is CAST(JSON_EXTRACT(..) AS VARCHAR) on SQLite and ->> on PostgreSQL; the key
    # travels as the bound JSON-path parameter.
    return ImageRecord.meta[key].as_string()


def where(image_filter: ImageFilter) -> ColumnElement[bool] | None:
    """One SQL condition for the filter, or None when it is empty."""
    if not image_filter:
        return None
    return and_(*(meta_text(key) == value for key, value in image_filter.conditions))


def matching_ids(session: Session, *, collection_id: int, image_filter: ImageFilter) -> np.ndarray:
    """Ids (int64, ascending) of the collection's images that pass the filter."""
    stmt = select(ImageRecord.id).where(ImageRecord.collection_id == collection_id)
    condition = where(image_filter)
    if condition is not None:
        stmt = stmt.where(condition)
    ids = session.scalars(stmt.order_by(ImageRecord.id)).all()
    return np.asarray(ids, dtype=np.int64)


def label_counts(session: Session, *, collection_id: int) -> list[tuple[str | None, int]]:
    """Every distinct label of the collection with its count, most common first (None: no label)."""
    label = meta_text("label")
    rows = session.execute(
        select(label, func.count())
        .where(ImageRecord.collection_id == collection_id)
        .group_by(label)
        .order_by(func.count().desc(), label)
    ).all()
    return [(None if value is None else str(value), int(count)) for value, count in rows]
