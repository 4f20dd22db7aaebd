"""API keys: scopes, creation (the secret is shown once), revocation, and the key ring that checks
a presented key against every stored hash in constant time.

Only a key's SHA-256 and a short visible prefix are stored. Keys may also come from configuration
(``CBIR_API_KEYS``: ``SCOPE:SECRET`` entries separated by commas); those are never written to the
database.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.data.db import Database
from app.data.records import ApiKeyRecord, utcnow

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
SECRET_PREFIX = "cbir_"
VISIBLE_CHARS = 12  # "cbir_" and 7 characters of the secret: enough to tell keys apart in a list
MIN_CONFIG_SECRET_CHARS = 16


class Scope(IntEnum):
    """What a key may do; each scope includes the ones below it."""

    read = 1  # search, browse, fetch images and jobs
    write = 2  # upload, import archives, delete images, create collections, change search options
    admin = 3  # import server folders and manifests, change the index kind, re-embed, delete a
    # collection, manage keys

    @classmethod
    def parse(cls, text: str) -> Scope:
        try:
            return cls[text.strip().lower()]
        except KeyError:
            raise InvalidRequest(f"unknown scope {text[:20]!r}: use read, write or admin") from None


class KeyNotFound(NotFound):
    code = "key_not_found"
    title = "API key not found"


class KeyExists(Conflict):
    code = "key_exists"
    title = "API key already exists"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name and scope."""

    name: str
    scope: Scope


@dataclass(frozen=True)
class KeyInfo:
    name: str
    scope: Scope
    prefix: str
    created_at: datetime | None
    revoked_at: datetime | None = None
    source: str = "database"  # or "config" (CBIR_API_KEYS)


def digest(secret: str) -> str:
    """The stored form of a key: SHA-256 hex (the secret is random, so no salt or slow hash)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _info(record: ApiKeyRecord) -> KeyInfo:
    return KeyInfo(
        name=record.name,
        scope=Scope[record.scope],
        prefix=record.prefix,
        created_at=record.created_at,
        revoked_at=record.revoked_at,
    )


def create_key(db: Database, *, name: str, scope: Scope) -> tuple[KeyInfo, str]:
    """A new key; returns its description and the secret, which is not stored and never shown again.
    The name of a revoked key may be reused."""
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(f"key name {name[:80]!r} is invalid: use 1-64 letters, digits, '_', '.' or '-'")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    with db.transaction() as session:
        existing = session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.name == name))
        if existing is not None:
            if existing.revoked_at is None:
                raise KeyExists(f"a key named {name!r} exists; revoke it first or choose another name")
            session.delete(existing)
            session.flush()
        record = ApiKeyRecord(
            name=name, scope=scope.name, prefix=secret[:VISIBLE_CHARS], sha256=digest(secret)
        )
        session.add(record)
        session.flush()
        return _info(record), secret


def create_first_key(db: Database, *, config_keys: str, name: str = "admin") -> str | None:
    """The secret of a new admin key when no key exists at all (none in ``config_keys``, none ever
    stored: a revoked one counts, as for CBIR_AUTH=auto); None otherwise. Replicas starting
    together create one key between them: names are unique."""
    if parse_config_keys(config_keys):
        return None
    with db.session() as session:
        if session.scalar(select(func.count()).select_from(ApiKeyRecord)):
            return None
    try:
        _, secret = create_key(db, name=name, scope=Scope.admin)
    except (KeyExists, IntegrityError):  # another process created it meanwhile
        return None
    return secret


def list_keys(db: Database) -> list[KeyInfo]:
    """Every stored key, revoked ones included, oldest first."""
    with db.session() as session:
        return [_info(r) for r in session.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.id))]


def revoke_key(db: Database, name: str) -> KeyInfo:
    """Revoke a key now (servers stop accepting it within KeyRing.refresh_s)."""
    with db.transaction() as session:
        record = session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.name == name))
        if record is None:
            raise KeyNotFound(f"no API key named {name!r}")
        if record.revoked_at is None:
            record.revoked_at = utcnow()
        return _info(record)


def parse_config_keys(text: str) -> list[tuple[KeyInfo, str]]:
    """``SCOPE:SECRET[,SCOPE:SECRET...]`` -> (description, SHA-256) per key; InvalidRequest with a
    message naming the bad entry (never the secret) otherwise."""
    keys: list[tuple[KeyInfo, str]] = []
    for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        scope_text, sep, secret = entry.partition(":")
        if not sep or scope_text.strip().lower() not in Scope.__members__:
            raise InvalidRequest(
                f"CBIR_API_KEYS entry {position} must be SCOPE:SECRET with a scope of read, write or admin"
            )
        secret = secret.strip()
        if len(secret) < MIN_CONFIG_SECRET_CHARS:
            raise InvalidRequest(
                f"CBIR_API_KEYS entry {position}: the secret must have at least {MIN_CONFIG_SECRET_CHARS} "
                "characters (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        scope = Scope.parse(scope_text)
        info = KeyInfo(
            name=f"config-{position}", scope=scope, prefix=secret[:4] + "…", created_at=None, source="config"
        )
        keys.append((info, digest(secret)))
    return keys


class KeyRing:
    """The keys a server accepts: the configured ones plus the database's unrevoked ones, re-read
    every ``refresh_s`` seconds so that `cbir keys create/revoke` reach a running server."""

    def __init__(self, db: Database, *, config_keys: str = "", refresh_s: float = 2.0) -> None:
        self.db = db
        self.refresh_s = refresh_s
        configured = parse_config_keys(config_keys)
        self._configured = [info for info, _ in configured]
        self._config = [(sha, Principal(info.name, info.scope)) for info, sha in configured]
        self._entries: list[tuple[str, Principal]] = list(self._config)
        self._ever = bool(self._config)
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    def configured(self) -> list[KeyInfo]:
        """The keys from CBIR_API_KEYS (their prefix is the secret's first 4 characters)."""
        return list(self._configured)

    def stale(self) -> bool:
        return self._loaded_at is None or time.monotonic() - self._loaded_at >= self.refresh_s

    def invalidate(self) -> None:
        self._loaded_at = None

    def refresh(self) -> None:
        """Re-read the stored keys (blocking: call it off the event loop). A database error keeps
        the keys last read when there are some, so an outage does not lock everyone out."""
        with self._lock:
            if not self.stale():
                return
            try:
                with self.db.session() as session:
                    rows = session.execute(
                        select(ApiKeyRecord.sha256, ApiKeyRecord.name, ApiKeyRecord.scope).where(
                            ApiKeyRecord.revoked_at.is_(None)
                        )
                    ).all()
                    ever = bool(session.scalar(select(func.count()).select_from(ApiKeyRecord)))
            except Exception:
                if self._loaded_at is None:
                    raise
                log.warning("could not re-read the API keys; using the ones read before", exc_info=True)
                self._loaded_at = time.monotonic()
                return
            stored = [(sha, Principal(name, Scope[scope])) for sha, name, scope in rows]
            self._entries = self._config + stored
            self._ever = bool(self._config) or ever
            self._loaded_at = time.monotonic()

    def any_keys(self) -> bool:
        """Whether a key was ever configured or created (revoked ones count: revoking the last key
        must not open the service)."""
        return self._ever

    def authenticate(self, secret: str) -> Principal | None:
        """The key's principal, or None. The presented key's hash is compared with every stored
        hash by ``secrets.compare_digest``, without stopping at a match, so the time taken says
        nothing about which key (or which first bytes) matched."""
        presented = digest(secret)
        found: Principal | None = None
        for stored, principal in self._entries:
            if secrets.compare_digest(presented, stored) and found is None:
                found = principal
        return found
