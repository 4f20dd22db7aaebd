"""Rewrite, on start, the metadata rows an older version stored that readers refuse.

Before app/core/usertext.py checked metadata, an upload could store ``{"note": NaN}`` (JSON text that
SQLite's JSON functions call malformed), a lone surrogate (``"\\ud800"``: PostgreSQL's ``->>``
and the UTF-8 encoder refuse it) or a NUL (``\\u0000``: PostgreSQL cannot extract it as text).
One such row made labels, filters and searches of its whole collection answer 500. Each is
rewritten as ``servable`` shows it (null for NaN and infinity, U+FFFD for the bad characters).

Only suspects are read: rows whose text SQLite finds invalid, or whose text holds a ``\\ud8``-
``\\udf`` or ``\\u0000`` escape (how Python's JSON encoder writes those characters); a surrogate
pair (an emoji) matches too and is left as it is.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import Text, cast, func, or_, select, update

from app.core.usertext import servable
from app.data.db import Database
from app.data.records import ImageRecord

log = logging.getLogger(__name__)

# A lone surrogate or a NUL as Python's JSON encoder writes them: \udXXX (X from 8 to f), \u0000.
_SQLITE_SUSPECTS = ("*\\u[dD][89abcdefABCDEF]*", "*\\u0000*")  # GLOB: one pass each
_POSTGRES_SUSPECT = r"\\u([dD][89a-fA-F]|0000)"  # ~, a POSIX regular expression


def repair_stored_metadata(db: Database) -> int:
    """Rewrite the images' metadata no reader could serve; returns how many rows changed (about
    50 ms to look through 60,000 rows on SQLite)."""
    raw = cast(ImageRecord.meta, Text)
    if db.engine.dialect.name == "sqlite":
        suspect = or_(*(raw.op("GLOB")(p) for p in _SQLITE_SUSPECTS), func.json_valid(raw) == 0)
    else:  # PostgreSQL's json type refuses NaN on insert: only the escapes can be there
        suspect = raw.op("~")(_POSTGRES_SUSPECT)
    with db.session() as session:
        rows = session.execute(select(ImageRecord.id, raw).where(suspect)).all()
    repaired: dict[int, Any] = {}
    for image_id, text in rows:
        try:
            stored = json.loads(text)
            clean = servable(stored) if isinstance(stored, dict) else {}
            # NaN != NaN: compared as text ("NaN" against "null"); an emoji's pair is unchanged
            if json.dumps(clean, sort_keys=True) != json.dumps(stored, sort_keys=True):
                repaired[image_id] = clean
        except (ValueError, RecursionError):  # not even Python's lenient JSON: nothing to keep
            repaired[image_id] = {}
    if repaired:
        with db.transaction() as session:
            for image_id, clean in repaired.items():
                session.execute(update(ImageRecord).where(ImageRecord.id == image_id).values(meta=clean))
        log.warning(
            "rewrote the metadata of %d image(s) stored with NaN, infinity, a lone surrogate or a NUL "
            "(now null or U+FFFD): ids %s",
            len(repaired),
            sorted(repaired)[:20],
        )
    return len(repaired)


def repair_on_start(db: Database) -> None:
    """``repair_stored_metadata`` unless the database is read-only; a failure is logged, never
    a reason not to start (the rows stay as they are)."""
    if db.read_only:
        return
    try:
        repair_stored_metadata(db)
    except Exception:
        log.exception("could not check the stored metadata for NaN, infinity or lone surrogates")
