"""jobs keep a high-water mark of the source so an interrupted import resumes where it stopped

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 14:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Source entries 0..cursor-1 are committed (rows, vectors and counters in one transaction).
        batch.add_column(sa.Column("cursor", sa.Integer(), nullable=False, server_default="0"))
        # How many times the job was picked up again after a crash or restart.
        batch.add_column(sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        # The journal file of the process running it (locked while that process lives).
        batch.add_column(sa.Column("owner", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner")
        batch.drop_column("updated_at")
        batch.drop_column("resumes")
        batch.drop_column("cursor")
