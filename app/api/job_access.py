"""What a caller may see and do of a job.

- Server paths (folder, IDX, Holidays and manifest imports) are shown to admin keys only, as
  starting those imports needs one (``CBIR_AUTH=off`` shows them to everyone); others see the
  import root the path lies under.
- A job's details (per-item errors, report, events), and cancelling it, need the scope of the key
  that started it (``creator`` in its parameters; jobs started without a key, or before creators
  were recorded, are anonymous) while keys are enforced. Below that scope a job shows its state
  and counters. The page's background evaluations keep their creator the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from app.access.keys import Scope
from app.api import security
from app.data.records import JobRecord

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Viewer:
    scope: Scope | None  # the scope of the caller's key; None: no key
    enforced: bool = True  # keys are enforced (CBIR_AUTH on, or auto with keys)
    auth_off: bool = False
    roots: Mapping[str, Path] = field(default_factory=dict)  # CBIR_IMPORT_ROOTS by name

    @property
    def sees_paths(self) -> bool:
        return self.auth_off or (self.scope is not None and self.scope >= Scope.admin)

    def sees_details(self, record: JobRecord) -> bool:
        needed = creator_scope(record)
        if needed is None or self.auth_off or not self.enforced:
            return True
        return self.scope is not None and self.scope >= needed


def creator(request: Request) -> str:
    """The scope of the caller's key, or ``anonymous``: recorded on the jobs it starts."""
    access: security.Access | None = request.scope.get(security.ACCESS)
    principal = access.principal if access is not None else None
    return principal.scope.name if principal is not None else ANONYMOUS


def creator_scope(record: JobRecord) -> Scope | None:
    return scope_named((record.params or {}).get("creator", ANONYMOUS))


def scope_named(creator: str) -> Scope | None:
    """The scope a recorded ``creator`` names; None for anonymous work."""
    return Scope.__members__.get(creator) if creator != ANONYMOUS else None


def viewer(request: Request, *, roots: Mapping[str, Path]) -> Viewer:
    access: security.Access | None = request.scope.get(security.ACCESS)
    if access is None:  # the access middleware did not run: the least a caller may see
        return Viewer(scope=None, roots=roots)
    scope = access.principal.scope if access.principal is not None else None
    return Viewer(scope=scope, enforced=access.enforced, auth_off=access.auth_off, roots=roots)


def require_details(request: Request, record: JobRecord, *, what: str) -> None:
    """Raise Unauthorized or Forbidden unless the caller has the scope of the job's creator (its
    details, or cancelling it)."""
    require_creator(request, (record.params or {}).get("creator", ANONYMOUS), what=what)


def require_creator(request: Request, creator: str, *, what: str) -> None:
    """Raise Unauthorized or Forbidden unless the caller has the scope ``creator`` names."""
    needed = scope_named(creator)
    if needed is not None:
        security.require(request, needed, what=what)
