"""jobs are claimed with a lease: any worker process may run a job, and take over one whose lease ran out

``lease_until``: the job's owner renews it while it runs (``CBIR_JOB_LEASE_SECONDS``); once it has
passed, the owner is taken to be dead and another worker resumes the job at its high-water mark.
``cancel_requested``: a cancel asked of any replica, seen by whichever worker holds the job.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # Workers look for claimable jobs by state and age.
    op.create_index("ix_jobs_state_created", "jobs", ["state", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_created", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested")
        batch.drop_column("lease_until")
