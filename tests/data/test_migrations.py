"""Alembic migrations: build the schema the models describe, and come down and up again cleanly.

They run on both backends: a SQLite file, and on the PostgreSQL run of ``make test`` an empty
schema of the test database.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect

from app.data.db import Database, alembic_config
from app.data.records import Base
from tests.conftest import ON_POSTGRES

TABLES = {"collections", "images", "embeddings", "checkpoints", "jobs", "api_keys"} | {
    "duplicate_runs",
    "duplicate_resolutions",
    "duplicate_groups",
    "duplicate_members",
    "duplicate_pairs",
}


@pytest.fixture
def url(tmp_path: Path, database_url: str) -> str:
    """An empty database: a SQLite file, or this test's PostgreSQL schema on the PostgreSQL run."""
    return database_url or f"sqlite:///{tmp_path / 'migrations.sqlite3'}"


@pytest.fixture
def engine(url: str):
    engine = create_engine(url)
    yield engine
    engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def leftovers(engine: Engine) -> set[str]:
    """Tables, and on PostgreSQL sequences, still there (nothing after a downgrade to base)."""
    sequences = set(inspect(engine).get_sequence_names()) if engine.dialect.name == "postgresql" else set()
    return tables(engine) | sequences


def differences(engine: Engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "render_as_batch": True})
        return compare_metadata(context, Base.metadata)


def test_migrations_run_on_the_backend_under_test(engine: Engine):
    assert engine.dialect.name == ("postgresql" if ON_POSTGRES else "sqlite")


def test_there_is_a_single_head():
    assert len(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()) == 1


def test_upgrade_head_on_an_empty_database_creates_every_table(url: str, engine: Engine):
    command.upgrade(alembic_config(url), "head")
    assert tables(engine) == TABLES == set(Base.metadata.tables)


def test_migrated_schema_matches_the_models(url: str, engine: Engine):
    command.upgrade(alembic_config(url), "head")
    assert differences(engine) == []


def test_downgrade_to_base_then_upgrade_again(url: str, engine: Engine):
    config = alembic_config(url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    assert leftovers(engine) == set()
    command.upgrade(config, "head")
    assert tables(engine) == TABLES
    assert differences(engine) == []


def test_app_migrate_is_idempotent(url: str, engine: Engine):
    database = Database(url)
    try:
        database.migrate()
        database.migrate()
    finally:
        database.dispose()
    assert tables(engine) == TABLES
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head
