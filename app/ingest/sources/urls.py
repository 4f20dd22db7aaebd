"""Source kind ``urls``: a list of image URLs, each fetched with the safe fetcher
(app/ingest/sources/fetch.py).

The list is checked when the job is queued (size cap, the feature on); each entry is judged when
the job reaches it. What needs no network (syntax, scheme, port, an IP literal's range) makes a
rejected member straight away; the fetch itself happens when the pipeline reads the member, so a
resumed job skips the URLs it has already committed without fetching them again. A URL listed
twice (by its normalised form) is fetched once and reported as a duplicate the second time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import FetchTimeout, InvalidRequest, TooManyUrls, UrlImportDisabled, UrlRejected
from app.core.redaction import redact_url
from app.ingest.sources.base import Member, Reading, Source
from app.ingest.sources.fetch import fetch
from app.ingest.sources.url_checks import MAX_URL_CHARS, FetchPolicy, Target, check_target, parse_url

# What is kept of an over-long entry (in the job row and the report): it is invalid anyway.
MAX_KEPT_CHARS = MAX_URL_CHARS + 1
MAX_NAME_CHARS = 300
MAX_LIST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class UrlSource(Source):
    urls: tuple[str, ...]  # fetched one by one when the pipeline reads each member

    kind = "urls"

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        return {"urls": list(self.urls)}

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> UrlSource:
        return cls(tuple(str(u) for u in params["urls"]))

    def members(self, reading: Reading) -> Iterator[Member]:
        if reading.settings is None:
            raise TypeError("URL members need the service's fetch settings: use members_of")
        yield from url_members(self, reading.settings)

    def count(self, reading: Reading) -> int | None:
        return len(self.urls)


def check_urls(urls: list[Any], *, settings: Any) -> UrlSource:
    """A list of URLs to import (413 above CBIR_MAX_URLS, 422 when empty). Bad entries are not an
    error here: each is reported in the job."""
    if not settings.url_import_enabled:
        raise UrlImportDisabled("importing from URLs is off on this service (CBIR_URL_IMPORT_ENABLED)")
    if not urls:
        raise InvalidRequest('"urls" lists no URL')
    if len(urls) > settings.max_urls:
        raise TooManyUrls(f"{len(urls)} URLs; at most {settings.max_urls} per import (CBIR_MAX_URLS)")
    return UrlSource(tuple(u[:MAX_KEPT_CHARS] if isinstance(u, str) else "" for u in urls))


def read_url_list(path: Path) -> list[str]:
    """The URLs of a text file, one a line (blank lines and # comments skipped): `cbir import --urls`."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_LIST_BYTES + 1)
    except OSError as exc:
        raise InvalidRequest(f"cannot read the URL list {str(path)[:200]!r}: {exc.strerror}") from None
    if len(data) > MAX_LIST_BYTES:
        raise TooManyUrls(f"the URL list {path.name!r} is larger than {MAX_LIST_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest(f"the URL list {path.name!r} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def url_members(source: UrlSource, settings: Any) -> Iterator[Member]:
    policy = FetchPolicy.from_settings(settings)
    job_deadline = time.monotonic() + settings.url_job_deadline_s
    first_seen: dict[str, int] = {}
    for number, url in enumerate(source.urls, 1):
        # Named without user-info or query: the name and metadata are stored with the image and
        # shown to every reader; the fetch below uses the whole URL.
        name = redact_url(url)[:MAX_NAME_CHARS] or f"url {number}"
        try:
            target = parse_url(url)
            check_target(target, policy)
        except UrlRejected as exc:
            yield Member(name, reject=(exc.code, exc.detail))
            continue
        if target.key in first_seen:
            earlier = first_seen[target.key]
            yield Member(name, reject=("duplicate_url", f"the same URL as entry {earlier}: fetched once"))
            continue
        first_seen[target.key] = number
        yield Member(
            name,
            {"url": redact_url(url)[:512]},
            read=lambda target=target: _fetch(target, policy, job_deadline, settings.url_job_deadline_s),  # type: ignore[misc]
        )


def _fetch(target: Target, policy: FetchPolicy, job_deadline: float, job_deadline_s: float) -> bytes:
    if time.monotonic() >= job_deadline:
        raise FetchTimeout(f"the import's deadline of {job_deadline_s:g} s passed before this URL")
    return fetch(target.url, policy, deadline=job_deadline).data
