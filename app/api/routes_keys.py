"""API keys over HTTP (admin scope): list, create (the secret is in the answer, once), revoke.

The first key comes from `cbir keys create` or CBIR_API_KEYS: these routes always need an admin
key, even while no key exists and CBIR_AUTH=auto lets every other request through.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from app.access import keys
from app.api import security
from app.api.deps import ContextDep
from app.api.schemas import KeyCreate, KeyCreated, KeyList, KeyOut
from app.core.errors import Forbidden, Unauthorized

router = APIRouter(tags=["keys"])


def _out(info: keys.KeyInfo) -> KeyOut:
    return KeyOut(
        name=info.name,
        scope=info.scope.name,
        prefix=info.prefix,
        source=info.source,
        created_at=info.created_at,
        revoked_at=info.revoked_at,
    )


def _require_admin_key(request: Request) -> None:
    access: security.Access | None = request.scope.get(security.ACCESS)
    principal = access.principal if access else None
    if principal is None:
        raise Unauthorized(
            "managing API keys over HTTP needs an admin key in the X-API-Key header "
            "(the first: cbir keys create NAME --scope admin)"
        )
    if principal.scope < keys.Scope.admin:
        raise Forbidden("managing API keys over HTTP needs an admin key (the first: cbir keys create)")


def _ring(request: Request) -> keys.KeyRing | None:
    return request.app.state.guard.keys  # type: ignore[no-any-return]


@router.get("/keys", response_model=KeyList, openapi_extra=security.ADMIN)
def list_keys(request: Request, ctx: ContextDep) -> KeyList:
    """Every key (revoked ones too) with its visible prefix; never a secret."""
    _require_admin_key(request)
    ring = _ring(request)
    configured = ring.configured() if ring else []
    return KeyList(keys=[_out(info) for info in [*configured, *keys.list_keys(ctx.db)]])


@router.post(
    "/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated, openapi_extra=security.ADMIN
)
def create_key(body: KeyCreate, request: Request, ctx: ContextDep) -> KeyCreated:
    _require_admin_key(request)
    info, secret = keys.create_key(ctx.db, name=body.name, scope=keys.Scope[body.scope])
    if ring := _ring(request):
        ring.invalidate()
    return KeyCreated(key=_out(info), secret=secret)


@router.delete("/keys/{name}", response_model=KeyOut, openapi_extra=security.ADMIN)
def revoke_key(name: str, request: Request, ctx: ContextDep) -> KeyOut:
    """Revoke a key: this server refuses it at once, other servers on the database within seconds."""
    _require_admin_key(request)
    info = keys.revoke_key(ctx.db, name)
    if ring := _ring(request):
        ring.invalidate()
    return _out(info)
