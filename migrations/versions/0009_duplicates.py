"""near-duplicate groups: each collection's latest run, its groups (members, pairs with scores) and
the resolutions people made, which outlive runs

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

IMAGE_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _image_fk(column: str, table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["images.id"], name=op.f(f"fk_{table}_{column}_images"), ondelete="CASCADE"
    )


def _collection_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["collection_id"],
        ["collections.id"],
        name=op.f(f"fk_{table}_collection_id_collections"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "duplicate_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("embedder_version", sa.String(length=128), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("pairs", sa.Integer(), nullable=False),
        sa.Column("groups", sa.Integer(), nullable=False),
        sa.Column("truncated_rows", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _collection_fk("duplicate_runs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_duplicate_runs")),
        sa.UniqueConstraint("collection_id", name=op.f("uq_duplicate_runs_collection_id")),
        sqlite_autoincrement=True,  # ids never reused: a client's id of a deleted row finds nothing
    )
    op.create_table(
        "duplicate_resolutions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("keep_image_id", IMAGE_ID, nullable=True),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _collection_fk("duplicate_resolutions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_duplicate_resolutions")),
        sqlite_autoincrement=True,  # ids never reused: a client's id of a deleted row finds nothing
    )
    op.create_index(
        op.f("ix_duplicate_resolutions_collection_id"), "duplicate_resolutions", ["collection_id"]
    )
    op.create_table(
        "duplicate_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reopened", sa.Boolean(), nullable=False),
        sa.Column("resolution_id", sa.Integer(), nullable=True),
        _collection_fk("duplicate_groups"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["duplicate_runs.id"],
            name=op.f("fk_duplicate_groups_run_id_duplicate_runs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["resolution_id"],
            ["duplicate_resolutions.id"],
            name=op.f("fk_duplicate_groups_resolution_id_duplicate_resolutions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_duplicate_groups")),
        sqlite_autoincrement=True,  # ids never reused: a client's id of a deleted row finds nothing
    )
    op.create_index(op.f("ix_duplicate_groups_collection_id"), "duplicate_groups", ["collection_id"])
    op.create_index(op.f("ix_duplicate_groups_resolution_id"), "duplicate_groups", ["resolution_id"])
    op.create_index("ix_duplicate_groups_run_rank", "duplicate_groups", ["run_id", "rank"])
    op.create_table(
        "duplicate_members",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("image_id", IMAGE_ID, nullable=False),
        sa.Column("new", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["duplicate_groups.id"],
            name=op.f("fk_duplicate_members_group_id_duplicate_groups"),
            ondelete="CASCADE",
        ),
        _image_fk("image_id", "duplicate_members"),
        sa.PrimaryKeyConstraint("group_id", "image_id", name=op.f("pk_duplicate_members")),
    )
    op.create_index(op.f("ix_duplicate_members_image_id"), "duplicate_members", ["image_id"])
    op.create_table(
        "duplicate_pairs",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("left_id", IMAGE_ID, nullable=False),
        sa.Column("right_id", IMAGE_ID, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["duplicate_groups.id"],
            name=op.f("fk_duplicate_pairs_group_id_duplicate_groups"),
            ondelete="CASCADE",
        ),
        _image_fk("left_id", "duplicate_pairs"),
        _image_fk("right_id", "duplicate_pairs"),
        sa.PrimaryKeyConstraint("group_id", "left_id", "right_id", name=op.f("pk_duplicate_pairs")),
    )
    op.create_index(op.f("ix_duplicate_pairs_left_id"), "duplicate_pairs", ["left_id"])
    op.create_index(op.f("ix_duplicate_pairs_right_id"), "duplicate_pairs", ["right_id"])


def downgrade() -> None:
    op.drop_table("duplicate_pairs")
    op.drop_table("duplicate_members")
    op.drop_table("duplicate_groups")
    op.drop_table("duplicate_resolutions")
    op.drop_table("duplicate_runs")
