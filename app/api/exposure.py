"""Whether a keyless service is reachable from other machines, and the refusal of its writes.

``make run`` listens on 127.0.0.1 and is keyless until a key exists (CBIR_AUTH=auto). The same
default on a service that other machines reach (``docker compose up`` publishes 0.0.0.0:8000) would
let anyone delete collections or start imports, so there writes and admin routes are refused
until a key exists. The service stays up: pages, searches and health checks keep working, and the
refusal tells the caller how to create a key at the moment it matters (a service that refused to
start would only say so in a log, and leave the container restarting).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from typing import Any

from app.core.errors import AuthRequired

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)  # asked on every request, of the same few addresses
def is_loopback(host: str) -> bool | None:
    """Whether ``host`` is a loopback address; None when it is no address at all (a unix socket's
    path, a test transport's "testserver"). ``localhost`` counts as loopback."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def exposure(*, listen_host: str, server: Any) -> str | None:
    """Why this request may come from another machine (None: it cannot): the service listens on a
    non-loopback CBIR_HOST (0.0.0.0, ::, an interface's address or a host name other than
    localhost), or the connection arrived on a non-loopback address (ASGI ``scope["server"]``:
    uvicorn started with its own --host)."""
    if is_loopback(listen_host) is not True:
        return f"it listens on CBIR_HOST={listen_host}"
    host = server[0] if isinstance(server, (tuple, list)) and server else None
    if isinstance(host, str) and is_loopback(host) is False:
        return f"this request arrived on {host}"
    return None


def log_refusing(why: str) -> None:
    """The log line an operator sees: the caller logs it once per service (app.api.security.Guard)."""
    log.warning(
        "refusing writes: the service is reachable from other machines (%s) and no API key "
        "exists; create one with `cbir keys create --scope admin NAME` or set CBIR_API_KEYS",
        why,
    )


def refusal(what: str, *, why: str) -> AuthRequired:
    """The 403 auth_required for a write on an exposed keyless service."""
    return AuthRequired(
        f"{what} is refused: this service is reachable from other machines ({why}) and no API key "
        "exists yet. Create an admin key with `cbir keys create --scope admin NAME` (in Docker: "
        "`docker compose exec app cbir keys create --scope admin NAME`) or set "
        "CBIR_API_KEYS=admin:SECRET, then send it in the X-API-Key header. CBIR_AUTH=off serves "
        "keyless writes on purpose."
    )
