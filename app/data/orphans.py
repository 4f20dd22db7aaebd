"""Image files written for rows that never committed: found through a FileJournal, removed."""

from __future__ import annotations

import logging

from sqlalchemy import select

from app.data.db import Database
from app.data.records import ImageRecord
from app.data.storage import FileJournal, ImageStore

log = logging.getLogger(__name__)


def remove_unreferenced_files(
    *,
    db: Database,
    store: ImageStore,
    journal: FileJournal | None = None,
    entries: list[tuple[str, str]] | None = None,
) -> int:
    """Delete the files a journal names that no image row refers to: ``entries`` of this
    process's journal (a transaction that rolled back, a pipeline that stopped), or everything a
    dead process's journal names. Returns how many files went."""
    journal = journal or store.journal
    if entries is None:
        entries = journal.entries()
    if not entries:
        return 0
    removed = 0
    try:
        with db.session() as session:
            shas = sorted({sha for sha, _ in entries})
            kept: set[str] = set()
            for start in range(0, len(shas), 500):
                kept.update(
                    session.scalars(
                        select(ImageRecord.sha256)
                        .where(ImageRecord.sha256.in_(shas[start : start + 500]))
                        .distinct()
                    )
                )
    except Exception:  # the database is away: keep the journal for the next start
        log.warning("could not check %d journalled files against the database", len(entries))
        return 0
    for sha, image_format in entries:
        if sha not in kept:
            removed += store.discard(sha, image_format)
    if journal is store.journal:
        journal.settle(entries)
    else:
        journal.clear()
    return removed
