"""Filters for browse, search and similar: ``label=7`` (label equals), ``label=3&label=5`` (label
in a list), ``meta=split:train`` (any metadata key equals a value), ``created_after=2026-01-31``.

Values are compared as text with the stored metadata value (a number matches its decimal text)
and only ever reach SQL as bound parameters: the key through SQLAlchemy's JSON path parameter,
the value as a bound comparison value, the date as a bound timestamp. The syntax is validated
here (keys by pattern, values by length, dates by ISO 8601); nothing is spliced into SQL text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest
from app.data.records import ImageRecord

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_VALUE_CHARS = 256
MAX_CONDITIONS = 8
MAX_LABELS = 100


@dataclass(frozen=True)
class ImageFilter:
    """Conditions that must all hold: metadata ``key == value`` (``label`` is one key), the label
    one of ``labels`` (when given), and created after ``created_after`` (UTC)."""

    conditions: tuple[tuple[str, str], ...] = ()
    labels: tuple[str, ...] = ()
    created_after: datetime | None = None

    def __bool__(self) -> bool:
        return bool(self.conditions or self.labels or self.created_after)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.conditions)
        if self.labels:
            out["label"] = list(self.labels)
        if self.created_after is not None:
            out["created_after"] = self.created_after.isoformat()
        return out


def parse_date(value: str) -> datetime:
    """An ISO 8601 date or date-time (``2026-01-31``, ``2026-01-31T12:00:00+02:00``) as aware UTC;
    one without a zone is UTC. InvalidRequest otherwise."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise InvalidRequest(
            f"created_after {value[:40]!r} is not an ISO 8601 date or date-time, e.g. 2026-01-31 "
            "or 2026-01-31T12:00:00Z"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def parse_filter(
    *,
    label: str | Sequence[str] | None = None,
    meta: Sequence[str] = (),
    created_after: str | None = None,
) -> ImageFilter:
    """Validate ``label`` (one value, or several: any of them), ``meta`` (each ``KEY:VALUE``) and
    ``created_after`` (ISO 8601) into a filter; InvalidRequest if bad."""
    conditions: list[tuple[str, str]] = []
    labels: tuple[str, ...] = ()
    values = [label] if isinstance(label, str) else list(label or [])
    if len(values) > MAX_LABELS:
        raise InvalidRequest(f"at most {MAX_LABELS} labels in one filter, got {len(values)}")
    if len(values) == 1:
        conditions.append(("label", _value(values[0], "label")))
    elif values:
        labels = tuple(dict.fromkeys(_value(v, "label") for v in values))
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
    after = parse_date(created_after) if created_after is not None else None
    return ImageFilter(tuple(conditions), labels=labels, created_after=after)


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
    parts: list[ColumnElement[bool]] = [meta_text(key) == value for key, value in image_filter.conditions]
    if image_filter.labels:
        parts.append(meta_text("label").in_(image_filter.labels))
    if image_filter.created_after is not None:
        # Aware UTC: PostgreSQL compares instants; SQLite stores (and binds) the UTC wall-clock.
        parts.append(ImageRecord.created_at > image_filter.created_after)
    return and_(*parts)


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
