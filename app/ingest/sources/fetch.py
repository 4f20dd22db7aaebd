"""Fetch one image over HTTP(S) from a public address, never from this machine or its networks.

The defence against server-side request forgery, in the order it runs (what needs no network,
the URL's syntax, its port and an IP literal's range, is judged in app/ingest/sources/url_checks.py):

1. The URL: http or https only (else ``bad_scheme``); no credentials, spaces or control
   characters; a port in the allowed set (CBIR_URL_PORTS, 80 and 443 by default).
2. The host: an IP literal is judged as it stands; a numeric host in any other spelling
   (``2130706433``, ``0x7f.1``, ``127.1``) is refused outright; a name is resolved here, once,
   and refused if **any** of its addresses is loopback, private, link-local, shared (CGNAT),
   unspecified, multicast, reserved, documentation, or IPv6 that embeds IPv4 (mapped, NAT64, 6to4,
   Teredo) -> ``blocked_destination``. Our own table, not ``ipaddress.is_private`` alone: Python
   3.11 misclassifies some of these ranges.
3. The connection goes to the vetted address itself (no second lookup, so no DNS rebinding),
   with the original Host header and, for https, SNI and certificate checks for the host name.
4. Redirects are followed by hand, at most MAX_REDIRECTS, each target vetted again
   (``redirect_blocked``; a loop or one hop too many: ``too_many_redirects``).
5. The response: status 200 only; an image (or untyped) Content-Type (else ``not_an_image``,
   before any body is read); at most ``max_bytes`` on the wire and after inflating a gzip or
   deflate Content-Encoding (``remote_too_large``); connect and per-read timeouts plus a deadline
   for the whole fetch, redirects included, enforced by a watchdog that shuts the socket (``timeout``).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from app.core.errors import (
    BadScheme,
    BlockedDestination,
    FetchTimeout,
    HostNotFound,
    ImageRejected,
    InvalidUrl,
    RedirectBlocked,
    RemoteError,
    RemoteTooLarge,
    TooManyRedirects,
    UnsupportedEncoding,
    UrlRejected,
)
from app.core.redaction import quoted
from app.ingest.sources.url_checks import (
    SCHEMES,
    FetchPolicy,
    Target,
    blocked_reason,
    check_target,
    parse_url,
)

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
# Bodies we read: image types, or none said (the decoder judges the bytes either way).
UNTYPED = {"", "application/octet-stream", "binary/octet-stream"}
USER_AGENT = "cbir-url-import/1"


def resolve_host(host: str, port: int, *, timeout_s: float) -> list[str]:
    """The host's addresses (a seam for tests). getaddrinfo has no timeout of its own: it runs on
    a daemon thread that is abandoned when the time is up."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            result["infos"] = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except (OSError, UnicodeError) as exc:
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=lookup, name="cbir-resolve", daemon=True).start()
    if not done.wait(timeout_s):
        raise FetchTimeout(f"resolving {host!r} took longer than {timeout_s:.1f} s")
    if "error" in result:
        raise HostNotFound(f"{host!r} could not be resolved: {result['error']}")
    return [str(info[4][0]) for info in result["infos"]]


def vet(target: Target, policy: FetchPolicy, *, remaining_s: float) -> list[tuple[str, int]]:
    """The (address, port) pairs to connect to; raises BlockedDestination if any address the host
    has is not public (one private answer among public ones is how rebinding attacks start)."""
    check_target(target, policy)
    if target.host in policy.test_hosts:
        return [policy.test_hosts[target.host]]
    if target.literal is not None:
        return [(str(target.literal), target.port)]
    names = resolve_host(target.host, target.port, timeout_s=max(0.01, min(policy.timeout_s, remaining_s)))
    if not names:
        raise HostNotFound(f"{target.host!r} has no address")
    addresses = []
    for name in dict.fromkeys(names):
        address = ipaddress.ip_address(name.split("%", 1)[0])
        if reason := blocked_reason(address):
            raise BlockedDestination(f"{target.host!r} resolves to {reason}")
        addresses.append((str(address), target.port))
    return addresses


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str  # after redirects
    content_type: str


def fetch(url: str, policy: FetchPolicy, *, deadline: float | None = None) -> Fetched:
    """The body of ``url`` (an image, by its Content-Type), following at most MAX_REDIRECTS
    redirects. ``deadline`` (time.monotonic) ends the fetch sooner than ``policy.deadline_s``.

    Raises a UrlRejected subclass (its ``code`` says why), or ImageRejected for a body that is
    declared as something else than an image."""
    end = time.monotonic() + policy.deadline_s
    if deadline is not None:
        end = min(end, deadline)
    target = parse_url(url)
    seen = {target.key}
    for hop in range(MAX_REDIRECTS + 1):
        try:
            addresses = vet(target, policy, remaining_s=end - time.monotonic())
        except (BlockedDestination, BadScheme, InvalidUrl) as exc:
            if hop == 0:
                raise
            raise RedirectBlocked(f"redirected to {quoted(target.url)}: {exc.detail}") from None
        location = _request(target, addresses, policy, end=end)
        if isinstance(location, Fetched):
            return location
        try:
            target = parse_url(urljoin(target.url, location))
        except (BlockedDestination, BadScheme, InvalidUrl) as exc:
            raise RedirectBlocked(f"redirected to {quoted(location)}: {exc.detail}") from None
        if target.key in seen:
            raise TooManyRedirects(f"a redirect loop back to {quoted(target.url)}")
        seen.add(target.key)
    raise TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")


class _Watchdog:
    """Shuts the connection down at the deadline, whatever http.client is blocked in. It holds a
    duplicate of the socket's descriptor: shutdown acts on the connection, TLS wrapping included."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
            self._sock = sock.dup()
            if self.fired:
                self._shutdown()

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class _Connection(http.client.HTTPConnection):
    """http.client speaking to an address we chose: the Host header and SNI keep the name."""

    def __init__(
        self, target: Target, address: tuple[str, int], *, timeout_s: float, watchdog: _Watchdog
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.default_port = SCHEMES[target.scheme]  # Host: name without the default port
        self._address = address
        self._tls = target.scheme == "https"
        self._watchdog = watchdog

    def connect(self) -> None:
        sock = socket.create_connection(self._address, timeout=self.timeout)
        self._watchdog.watch(sock)
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def _request(
    target: Target, addresses: Iterable[tuple[str, int]], policy: FetchPolicy, *, end: float
) -> Fetched | str:
    """One GET: the response (Fetched) or a redirect's Location."""
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise FetchTimeout(f"the deadline of {policy.deadline_s:g} s passed")
    watchdog = _Watchdog(remaining)
    conn: _Connection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        errors, slow = [], False
        for address in addresses:
            left = end - time.monotonic()
            if left <= 0:
                break
            conn = _Connection(target, address, timeout_s=min(policy.timeout_s, left), watchdog=watchdog)
            try:
                conn.connect()
                break
            except OSError as exc:
                errors.append(f"{address[0]}: {exc}")
                slow = slow or isinstance(exc, TimeoutError)
                conn.close()
                conn = None
        if conn is None:
            if slow or watchdog.fired or time.monotonic() >= end:
                raise FetchTimeout(f"connecting to {target.host!r} timed out: {'; '.join(errors)[:300]}")
            raise RemoteError(f"could not connect to {target.host!r}: {'; '.join(errors)[:300]}")
        conn.request(
            "GET",
            target.path,
            headers={
                "User-Agent": USER_AGENT,
                "Accept": "image/*",
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
        )
        response = conn.getresponse()
        if response.status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise RemoteError(f"{quoted(target.url)} answered {response.status} without a Location")
            return location
        if response.status != 200:
            raise RemoteError(f"{quoted(target.url)} answered {response.status} {response.reason[:80]}")
        content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if content_type not in UNTYPED and not content_type.startswith("image/"):
            raise ImageRejected(f"{quoted(target.url)} sent {content_type[:80]!r}, not an image")
        data = _read_body(response, policy, watchdog=watchdog)
        return Fetched(data, target.url, content_type)
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        if watchdog.fired or isinstance(exc, TimeoutError):
            raise FetchTimeout(
                f"{quoted(target.url)} was too slow (deadline {policy.deadline_s:g} s, "
                f"{policy.timeout_s:g} s between reads)"
            ) from None
        raise RemoteError(f"{quoted(target.url)}: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        watchdog.cancel()
        if response is not None:  # with "Connection: close" the response owns the socket
            response.close()
        if conn is not None:
            conn.close()


def _read_body(response: http.client.HTTPResponse, policy: FetchPolicy, *, watchdog: _Watchdog) -> bytes:
    limit = policy.max_bytes
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise RemoteTooLarge(f"the server announces {int(length)} bytes; the limit is {limit}")
    inflater = _Inflater.for_encoding(response.getheader("Content-Encoding"), limit)
    parts: list[bytes] = []
    wire = 0
    while True:
        piece = response.read1(CHUNK)
        if watchdog.fired:
            raise FetchTimeout(f"the body did not arrive within {policy.deadline_s:g} s")
        if not piece:
            break
        wire += len(piece)
        if wire > limit:
            raise RemoteTooLarge(f"the body is larger than {limit} bytes")
        parts.append(inflater.feed(piece) if inflater else piece)
    if inflater:
        parts.append(inflater.finish())
    return b"".join(parts)


class _Inflater:
    """gzip or deflate Content-Encoding, inflated to at most ``limit`` bytes (a gzip bomb of a
    few kilobytes stops there)."""

    def __init__(self, wbits: int, limit: int) -> None:
        self._z = zlib.decompressobj(wbits)
        self._limit = limit
        self._size = 0

    @classmethod
    def for_encoding(cls, encoding: str | None, limit: int) -> _Inflater | None:
        value = (encoding or "").strip().lower()
        if value in ("", "identity"):
            return None
        if value in ("gzip", "x-gzip"):
            return cls(16 + zlib.MAX_WBITS, limit)
        if value == "deflate":
            return cls(zlib.MAX_WBITS, limit)
        raise UnsupportedEncoding(f"the Content-Encoding {value[:40]!r} is not read (gzip and deflate are)")

    def feed(self, data: bytes) -> bytes:
        room = self._limit - self._size
        try:
            out = self._z.decompress(data, room + 1)
        except zlib.error as exc:
            raise ImageRejected(f"the compressed body is corrupt: {exc}") from None
        self._size += len(out)
        if self._size > self._limit:
            raise RemoteTooLarge(f"the body inflates to more than {self._limit} bytes")
        return out

    def finish(self) -> bytes:
        out = self._z.flush()
        self._size += len(out)
        if self._size > self._limit:
            raise RemoteTooLarge(f"the body inflates to more than {self._limit} bytes")
        return out


__all__ = [
    "MAX_REDIRECTS",
    "FetchPolicy",
    "Fetched",
    "Target",
    "UrlRejected",
    "blocked_reason",
    "check_target",
    "fetch",
    "parse_url",
    "vet",
]
