"""Migration 0007: collections stored as a bare ``efficientnet_lite0`` (centre crop + average pooling
before its default changed) keep serving exactly their vectors, under an explicit spelling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import JSON, column, create_engine, table, text

from app.catalog.collections import get_collection
from app.context import open_context
from app.core.settings import Settings
from app.data.db import alembic_config
from app.data.records import utcnow
from models import cnn

# What the former default hashed into its version (CodeOptions.key() of a bare name then).
LEGACY_KEY = "layer=head,pooling=avg,p=3,input=crop,sizes=,flip=0"


def legacy_version() -> str:
    path = cnn.locate_weights(cnn.ARCHS["efficientnet_lite0"].weights(), weights_dir=None, download=False)
    tag = hashlib.sha256(f"{LEGACY_KEY}|{cnn.file_sha256(path)}|v1".encode()).hexdigest()[:12]
    return f"efficientnet_lite0-{tag}"


@pytest.fixture
def url(tmp_path: Path, database_url: str) -> str:
    return database_url or f"sqlite:///{tmp_path / 'data' / 'cbir.sqlite3'}"


def test_a_bare_lite0_collection_keeps_its_version_and_vectors(settings: Settings, url: str) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "0006")
    engine = create_engine(url)
    version = legacy_version()
    with engine.begin() as connection:
        rows = [
            ("old", "efficientnet_lite0", version),
            ("whole", "efficientnet_lite0:input=whole", None),
            ("best", "efficientnet_lite0:input=whole,pooling=rmac,sizes=288", None),
            ("other", "resnet18", None),
        ]
        for name, spec, stored in rows:
            connection.execute(
                text(
                    "INSERT INTO collections (name, embedder, embedder_version, index_factory, created_at) "
                    "VALUES (:n, :e, :v, 'auto', CURRENT_TIMESTAMP)"
                ),
                {"n": name, "e": spec, "v": stored},
            )
        # JSON columns through SQLAlchemy's JSON type: the same on SQLite and PostgreSQL
        counts = ("done", "added", "duplicates", "failed", "cursor", "resumes")
        jobs = table(
            "jobs",
            *(column(c) for c in ("id", "kind", "state", "created_at", *counts)),
            column("params", JSON()),
            column("errors", JSON()),
        )
        connection.execute(
            jobs.insert().values(
                id="j1",
                kind="reembed",
                state="queued",
                created_at=utcnow(),
                params={"embedder": "efficientnet_lite0"},
                errors=[],
                **dict.fromkeys(counts, 0),
            )
        )
        names = ("embedder", "version", "sha256", "path", "created_at")
        checkpoints = table(
            "checkpoints", *(column(c) for c in names), column("config", JSON()), column("metrics", JSON())
        )
        connection.execute(
            checkpoints.insert().values(
                embedder="cnn_head",
                version="cnn_head-1",
                sha256="x",
                path="h.pt",
                created_at=utcnow(),
                config={"arch": "head", "base": "efficientnet_lite0:input=whole,sizes=128"},
                metrics={},
            )
        )
    engine.dispose()

    ctx = open_context(settings.model_copy(update={"database_url": url}))  # upgrades to head
    try:
        spelt = {name: get_collection(ctx, name).embedder for name, _, _ in rows}
        assert spelt == {
            "old": "efficientnet_lite0:input=crop,pooling=avg",
            "whole": "efficientnet_lite0:pooling=avg,sizes=native",
            "best": "efficientnet_lite0",
            "other": "resnet18",
        }
        # the embedder it builds is the one that made the stored vectors: no IndexMismatch
        embedder = ctx.embedders.get(spelt["old"])
        assert embedder.version == version
        with ctx.db.session() as session:
            params = session.execute(text("SELECT params FROM jobs WHERE id = 'j1'")).scalar_one()
        params = json.loads(params) if isinstance(params, str) else params
        assert params["embedder"] == "efficientnet_lite0:input=crop,pooling=avg"
        # a classifier head's base network: whole image at 128 px, average pooling, as before
        with ctx.db.session() as session:
            config = session.execute(text("SELECT config FROM checkpoints")).scalar_one()
        config = json.loads(config) if isinstance(config, str) else config
        assert config == {"arch": "head", "base": "efficientnet_lite0:pooling=avg,sizes=128"}
    finally:
        ctx.close()

    command.downgrade(alembic_config(url), "0006")
    engine = create_engine(url)
    with engine.connect() as connection:
        back = dict(connection.execute(text("SELECT name, embedder FROM collections")).all())
    engine.dispose()
    assert back == {name: spec for name, spec, _ in rows}
