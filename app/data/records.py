"""Database tables (SQLAlchemy 2.0). Classes end in ``Record`` so nobody confuses them with images."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class CollectionRecord(Base):
    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    embedder: Mapped[str] = mapped_column(String(255))  # a spec string, name[:options]
    # The embedder version whose vectors are served; None until a trainable embedder is trained.
    embedder_version: Mapped[str | None] = mapped_column(String(128))
    checkpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("checkpoints.id", use_alter=True, ondelete="SET NULL")
    )
    # A FAISS factory string (Flat, HNSW32, IVF1024,PQ32, ...) or "auto": chosen by size.
    index_factory: Mapped[str] = mapped_column(String(128), default="auto")
    # Search parameters of the index, e.g. {"ef_search": 64, "nprobe": 16, "k_factor": 8}.
    index_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Query-side re-ranking defaults, e.g. {"qe": 2, "qe_alpha": 3.0} (alpha-query expansion).
    search_options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    checkpoint: Mapped[CheckpointRecord | None] = relationship(foreign_keys=[checkpoint_id])


class ImageRecord(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("collection_id", "sha256", name="uq_images_collection_sha256"),
        # Ids are public (URLs cached for a year): never hand a deleted image's id to another.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    byte_size: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    original_name: Mapped[str | None] = mapped_column(String(512))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EmbeddingRecord(Base):
    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("image_id", "embedder_version", name="uq_embeddings_image_version"),
        Index("ix_embeddings_version_image", "embedder_version", "image_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    embedder: Mapped[str] = mapped_column(String(255))  # a spec string, name[:options]
    embedder_version: Mapped[str] = mapped_column(String(128))
    dim: Mapped[int] = mapped_column(Integer)
    # float32 little-endian, L2-normalised, dim * 4 bytes.
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CheckpointRecord(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int | None] = mapped_column(
        ForeignKey("collections.id", ondelete="SET NULL"), index=True
    )
    embedder: Mapped[str] = mapped_column(String(255))  # a spec string, name[:options]
    version: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    # Relative to the data folder, so the folder can move.
    path: Mapped[str] = mapped_column(String(1024))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRecord(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    collection_id: Mapped[int | None] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    total: Mapped[int | None] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    added: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # First per-item errors: [{"item": name, "code": code, "detail": text}, ...] (capped).
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    # High-water mark: source entries 0..cursor-1 are committed, with the counters above, in the
    # same transaction as their rows; an interrupted job resumes from here.
    cursor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    resumes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The journal file name of the process running the job: locked while that process lives, so a
    # restarting server leaves alone a job that `cbir import` is still running.
    owner: Mapped[str | None] = mapped_column(String(128))
    # The owner renews this while it runs the job; once passed, another worker may take it over.
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Asked by any replica; the worker holding the job stops after its current batch.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKeyRecord(Base):
    """An API key: only its SHA-256 and a short visible prefix are stored, never the secret."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))  # read, write or admin
    prefix: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Revoked keys stay (so `auth=auto` stays on once a key ever existed, and the list shows them).
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# -- near-duplicate groups (app/duplicates) ---------------------------------------------------------
_IMAGE_ID = BigInteger().with_variant(Integer, "sqlite")


class DuplicateRunRecord(Base):
    """The latest near-duplicate run of a collection: its groups replace the previous run's."""

    __tablename__ = "duplicate_runs"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), unique=True)
    job_id: Mapped[str | None] = mapped_column(String(32))
    embedder_version: Mapped[str] = mapped_column(String(128))
    threshold: Mapped[float] = mapped_column(Float)
    images: Mapped[int] = mapped_column(Integer)
    pairs: Mapped[int] = mapped_column(Integer)
    groups: Mapped[int] = mapped_column(Integer)
    truncated_rows: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(16))
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DuplicateResolutionRecord(Base):
    """A person's decision on a group, kept with the member set it was made on (``members``, image
    ids): ``keep`` (``keep_image_id`` stays, the others are its duplicates) or ``not_duplicates``.
    Runs never delete one; resolving a group again replaces those it overlaps."""

    __tablename__ = "duplicate_resolutions"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    keep_image_id: Mapped[int | None] = mapped_column(_IMAGE_ID)
    members: Mapped[list[int]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DuplicateGroupRecord(Base):
    """A connected component of the run's pairs; ``rank`` 0 is the largest. ``status``: open or
    resolved; ``resolution_id``: the resolution that covers it, or (reopened) the one it outgrew."""

    __tablename__ = "duplicate_groups"
    # ids are never reused (a run replaces the groups of the last): a client's group id of an earlier
    # run finds nothing rather than another group
    __table_args__ = (Index("ix_duplicate_groups_run_rank", "run_id", "rank"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("duplicate_runs.id", ondelete="CASCADE"))
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    reopened: Mapped[bool] = mapped_column(Boolean, default=False)
    resolution_id: Mapped[int | None] = mapped_column(
        ForeignKey("duplicate_resolutions.id", ondelete="SET NULL"), index=True
    )


class DuplicateMemberRecord(Base):
    """An image of a group; ``new``: it joined the group after the resolution the group outgrew."""

    __tablename__ = "duplicate_members"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("duplicate_groups.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        _IMAGE_ID, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    new: Mapped[bool] = mapped_column(Boolean, default=False)


class DuplicatePairRecord(Base):
    """Two images of a group within the run's threshold, ``left_id < right_id``, with their cosine."""

    __tablename__ = "duplicate_pairs"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("duplicate_groups.id", ondelete="CASCADE"), primary_key=True
    )
    left_id: Mapped[int] = mapped_column(
        _IMAGE_ID, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    right_id: Mapped[int] = mapped_column(
        _IMAGE_ID, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    score: Mapped[float] = mapped_column(Float)
