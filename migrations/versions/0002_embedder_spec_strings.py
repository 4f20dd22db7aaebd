"""embedder columns hold spec strings (name plus options), up to 255 characters

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 11:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = ("collections", "embeddings", "checkpoints")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("embedder", existing_type=sa.String(64), type_=sa.String(255))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("embedder", existing_type=sa.String(255), type_=sa.String(64))
