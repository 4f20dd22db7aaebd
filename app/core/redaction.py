"""URLs as the service shows them: without user-info, query string or fragment.

A URL given to an import may carry secrets (``https://user:password@host/a.jpg``, a signed
``?X-Amz-Signature=...``). Whatever leaves the process (job parameters, report lines, per-item
errors, events, stored image names, log lines) names the URL by ``redact_url``: the scheme, the
host and the path, with ``?…`` (or ``#…``) where a query (or fragment) was. The job row keeps the
full URLs, which only the job runner reads, so that an interrupted job can resume.
"""

from __future__ import annotations

import json
import re

MARK = "…"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# A URL inside free text (an exception message, a log line): a scheme, "//", then no whitespace.
_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")
# Closing punctuation that text puts after a URL (quotes of a repr, a comma, a full stop).
_TRAILING = "'\"`)]}>,.;:!"


def redact_url(url: str) -> str:
    """``url`` without user-info, query, path parameters or fragment: ``https://u:p@host/a.jpg?sig=1``
    -> ``https://host/a.jpg?…``. Works on malformed URLs too (it never raises): the part before the
    first ``/`` after the scheme is taken as the host, up to its last ``@``, and a port that is not
    a number (``user:password`` with its ``@`` lost) is hidden as well."""
    # Leading blanks or junk before the scheme must not hide where the authority starts (the
    # fetcher may strip them and still send the password): take the first "://" when there is one.
    url = url.lstrip()
    cut = min((i for i in (url.find("?"), url.find("#"), url.find(";")) if i >= 0), default=len(url))
    head, tail = url[:cut], url[cut:]
    scheme = _SCHEME.match(head)
    separator = head.find("://")
    start = separator + 1 if separator >= 0 else scheme.end() if scheme else 0
    while start < len(head) and head[start] in "/\\":
        start += 1
    # Everything up to the last "@" goes: a password may hold "/" (then no parser agrees on where
    # the host starts), and a path that holds "@" only loses its display.
    if (at := head.rfind("@", start)) >= 0:
        head = head[:start] + head[at + 1 :]
    end = next((i for i in range(start, len(head)) if head[i] in "/\\"), len(head))
    host = _hide_port(head[start:end])
    return head[:start] + host + head[end:] + (tail[0] + MARK if tail else "")


def _hide_port(host: str) -> str:
    closing = host.find("]") + 1 if host.startswith("[") else 0
    name, colon, port = host[closing:].partition(":")
    if colon and not port.isdigit():
        return host[:closing] + name + ":" + MARK
    return host


def scrub_text(text: str) -> str:
    """``text`` with every URL in it redacted (messages that quote a URL, whatever raised them)."""
    if "://" not in text:
        return text

    def redact(match: re.Match[str]) -> str:
        found = match.group(0)
        url = found.rstrip(_TRAILING)
        return redact_url(url) + found[len(url) :]

    return _IN_TEXT.sub(redact, text)


def scrub_report(body: bytes) -> bytes:
    """A job report (JSON lines) with the URLs of its text fields redacted. Lines without a URL
    are passed through untouched, so an archive's report costs one scan."""
    if b"://" not in body:
        return body
    lines = []
    for line in body.split(b"\n"):
        if b"://" in line:
            try:
                entry = json.loads(line)
            except ValueError:
                line = scrub_text(line.decode("utf-8", "replace")).encode("utf-8")
            else:
                if isinstance(entry, dict):
                    entry = {k: scrub_text(v) if isinstance(v, str) else v for k, v in entry.items()}
                line = json.dumps(entry, ensure_ascii=False).encode("utf-8")
        lines.append(line)
    return b"\n".join(lines)


def quoted(url: str) -> str:
    """A URL for an error message: redacted, at most 200 characters, in quotes."""
    return repr(redact_url(url)[:200])
