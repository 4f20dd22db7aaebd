"""Import members whose text no reader could serve back are rejected before they are read.

Every import (archive, folder, manifest, URL list, dataset) passes its members through
``screened`` (app/ingest/pipeline.py), so the rules of app/core/usertext.py hold on every path,
whichever source produced the name or the metadata.
"""

from __future__ import annotations

from app.core.errors import BadMetadata
from app.core.usertext import check_metadata, printable, text_problem
from app.ingest.sources.base import Member


def screened(member: Member) -> Member:
    """``member``, or a rejected copy (``bad_name``, ``bad_metadata``) under a name the job's
    report can carry: a tar or folder name of bytes that are not UTF-8 arrives as lone surrogates."""
    problem = text_problem(member.name)
    if problem is not None:
        reject = member.reject or ("bad_name", f"the name {problem}")
        return Member(printable(member.name), reject=reject)
    if member.reject is None:
        try:
            check_metadata(member.metadata)
        except BadMetadata as exc:
            return Member(member.name, reject=(exc.code, exc.detail))
    return member
