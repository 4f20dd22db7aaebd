"""efficientnet_lite0 specs spelt out: its bare name now means input=whole,sizes=288,pooling=rmac

Specs are stored in their canonical spelling, which drops options equal to their default. The
defaults of ``efficientnet_lite0`` changed (centre crop + average pooling -> whole image at
288 px + R-MAC), so every stored spelling is rewritten to say the same choice under the new
defaults: the bare name becomes ``efficientnet_lite0:input=crop,pooling=avg``, and so on. The
options, hence the embedder version and the stored vectors, stay exactly what they were.

The old and new defaults are written out here, not imported: a migration must mean the same thing
whatever the code says later.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 14:00:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

NAME = "efficientnet_lite0"
OLD = {"layer": "head", "pooling": "avg", "p": "3", "input": "crop", "sizes": "", "flip": "0"}
NEW = {**OLD, "pooling": "rmac", "input": "whole", "sizes": "288"}


def respell(spec: str, *, before: dict[str, str], after: dict[str, str]) -> str:
    """The spelling under ``after``'s defaults of what ``spec`` meant under ``before``'s."""
    name, _, raw = spec.partition(":")
    if name != NAME:
        return spec
    given = dict(item.split("=", 1) for item in filter(None, raw.split(",")))
    full = {**before, **given}
    if full["input"] != "whole" or full["sizes"] == "native":
        full["sizes"] = ""  # a centre crop has no sizes; native is the weights' resize side, ""
    kept = {}
    for key, value in sorted(full.items()):
        if key == "sizes" and full["input"] != "whole":
            continue
        if value != after[key]:
            kept[key] = value or "native"  # only sizes may be empty: spelt native
    return name if not kept else name + ":" + ",".join(f"{k}={v}" for k, v in kept.items())


def _rewrite(*, before: dict[str, str], after: dict[str, str]) -> None:
    bind = op.get_bind()
    pattern = f"{NAME}%"
    for table in ("collections", "checkpoints", "embeddings"):
        found = bind.execute(
            sa.text(f"SELECT DISTINCT embedder FROM {table} WHERE embedder LIKE :p"), {"p": pattern}
        ).scalars()
        changes = {old: new for old in found if (new := respell(old, before=before, after=after)) != old}
        if not changes:
            continue
        # One statement, so a new spelling is never rewritten again as some other row's old one.
        column = sa.column("embedder", sa.String())
        bind.execute(
            sa.table(table, column)
            .update()
            .where(column.in_(list(changes)))
            .values(embedder=sa.case(changes, value=column))
        )
    # A classifier head names its base network's spec in its config; a pending switch its target.
    _rewrite_json(bind, table="checkpoints", column="config", key="base", before=before, after=after)
    _rewrite_json(bind, table="jobs", column="params", key="embedder", before=before, after=after)


def _rewrite_json(
    bind: Any, *, table: str, column: str, key: str, before: dict[str, str], after: dict[str, str]
) -> None:
    rows = sa.table(table, sa.column("id"), sa.column(column, sa.JSON()))
    for row_id, value in bind.execute(sa.select(rows.c.id, rows.c[column])).all():
        if not isinstance(value, dict) or not isinstance(value.get(key), str):
            continue
        new = respell(value[key], before=before, after=after)
        if new != value[key]:
            bind.execute(rows.update().where(rows.c.id == row_id).values({column: {**value, key: new}}))


def upgrade() -> None:
    _rewrite(before=OLD, after=NEW)


def downgrade() -> None:
    _rewrite(before=NEW, after=OLD)
