"""URL checks that need no network: a URL taken apart, its scheme, port and an IP literal's
range judged, and the address ranges that are never fetched from (steps 1 and 2 of the defence
described in app/ingest/sources/fetch.py, except the name lookup).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from app.core.errors import BadScheme, BlockedDestination, InvalidUrl
from app.core.hosts import parse_test_hosts

log = logging.getLogger(__name__)

SCHEMES = {"http": 80, "https": 443}
MAX_URL_CHARS = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IANA special-purpose ranges (RFC 6890 and successors) and everything not globally routable.
_BLOCKED_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network", 0.0.0.0 reaches the local host
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (CGNAT)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata at 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/96",  # unspecified, loopback, IPv4-compatible
        "::ffff:0:0/96",  # IPv4-mapped
        "::ffff:0:0:0/96",  # IPv4-translated
        "64:ff9b::/96",  # NAT64
        "64:ff9b:1::/48",
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments, Teredo included
        "2001:db8::/32",
        "2002::/16",  # 6to4
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local
        "ff00::/8",  # multicast
    )
]
# A host inet_aton would read as an IPv4 address: 1 to 4 parts of decimal, octal or hex.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def blocked_reason(address: IPAddress) -> str | None:
    """Why this address may not be fetched from, or None when it is a public one."""
    for network in _BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return f"{address} is in the special-purpose range {network}"
    if not address.is_global or address.is_multicast or address.is_reserved:
        return f"{address} is not a public address"
    return None


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    ports: frozenset[int] = frozenset({80, 443})
    timeout_s: float = 10.0  # to connect, and between two reads
    deadline_s: float = 30.0  # the whole fetch of one URL, redirects included
    # TEST ONLY (CBIR_URL_ALLOW_TEST_HOSTS): a host name reached at a fixed (ip, port) without the
    # address checks; redirects away from it are checked as usual.
    test_hosts: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> FetchPolicy:
        rules = settings.url_allow_test_hosts
        test_hosts = parse_test_hosts(rules)
        if test_hosts:
            log.warning("CBIR_URL_ALLOW_TEST_HOSTS is set (%s): a test-only hole in the SSRF checks", rules)
        return cls(
            max_bytes=settings.max_upload_bytes,
            ports=frozenset(settings.url_ports),
            timeout_s=settings.url_timeout_s,
            deadline_s=settings.url_deadline_s,
            test_hosts=test_hosts,
        )


@dataclass(frozen=True)
class Target:
    """A URL taken apart: what is vetted and what is connected to."""

    url: str
    scheme: str
    host: str  # lower case, IDNA-encoded; no brackets around IPv6
    port: int
    path: str  # path and query, percent-encoded, "/" when empty
    literal: IPAddress | None  # the host is an IP address

    @property
    def key(self) -> str:
        """The same for URLs that name the same resource (case of scheme and host, default port,
        fragment): one fetch per key."""
        host = f"[{self.host}]" if self.literal is not None and self.literal.version == 6 else self.host
        port = "" if self.port == SCHEMES[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


def parse_url(url: str) -> Target:
    """Take a URL apart; raises InvalidUrl or BadScheme. No network."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidUrl("an empty URL")
    if len(url) > MAX_URL_CHARS:
        raise InvalidUrl(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidUrl("the URL holds a space or a control character")
    scheme, _, rest = url.partition(":")
    if not rest or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise InvalidUrl("not an absolute URL (give http://host/path or https://host/path)")
    if scheme.lower() not in SCHEMES:
        raise BadScheme(f"the scheme {scheme[:20].lower()!r} is not fetched; only http and https are")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed "[" of an IPv6 host
        raise InvalidUrl(f"the URL is malformed: {exc}") from None
    if not rest.startswith("//") or not parts.netloc:
        raise InvalidUrl("the URL has no host")
    if "@" in parts.netloc or "\\" in parts.netloc:
        raise InvalidUrl("the URL holds credentials or a backslash in its host part")
    try:
        port = parts.port
        host = parts.hostname or ""
    except ValueError:  # not its text: it quotes the port, maybe a password that lost its "@"
        raise InvalidUrl("the URL's host or port is malformed (a port is a number up to 65535)") from None
    literal = _literal(host)
    if literal is None:
        host = _hostname(host)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~-._?")
    return Target(
        url=url,
        scheme=parts.scheme.lower(),
        host=str(literal) if literal is not None else host,
        port=port if port is not None else SCHEMES[parts.scheme.lower()],
        path=path,
        literal=literal,
    )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if "%" in host and ":" in host:  # an IPv6 zone index ("fe80::1%eth0")
        raise BlockedDestination(f"{host[:80]!r} is a scoped (link-local) IPv6 address")
    if _NUMERIC_HOST.match(host):
        # inet_aton and every browser read these as IPv4 (2130706433 and 0x7f.1 are 127.0.0.1);
        # no real host is named so.
        raise BlockedDestination(f"{host[:80]!r} is a numeric address in a non-standard spelling")
    return None


def _hostname(host: str) -> str:
    host = host.rstrip(".") if host.endswith(".") and not host.endswith("..") else host
    if not host:
        raise InvalidUrl("the URL has no host")
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidUrl(f"{host[:80]!r} is not a valid host name") from None
    labels = ascii_host.split(".")
    if len(ascii_host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InvalidUrl(f"{host[:80]!r} is not a valid host name")
    return ascii_host


def check_target(target: Target, policy: FetchPolicy) -> None:
    """What can be judged without the network: the port and an IP literal's range."""
    if target.host in policy.test_hosts:
        return
    if target.port not in policy.ports:
        raise BlockedDestination(
            f"port {target.port} is not fetched from (allowed: {', '.join(map(str, sorted(policy.ports)))})"
        )
    if target.literal is not None and (reason := blocked_reason(target.literal)):
        raise BlockedDestination(reason)
