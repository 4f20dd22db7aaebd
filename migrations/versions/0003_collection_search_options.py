"""collections carry their search options (query expansion)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 11:25:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("collections", sa.Column("search_options", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("collections") as batch:
        batch.drop_column("search_options")
