"""``cbir serve --role api`` and ``cbir worker``: separate roles start only on shared parts
(PostgreSQL and a vector store every process reaches), and say so clearly otherwise. Their work
together is tests/scale's."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main
from app.cli.roles import shared_parts_problem
from app.core.settings import Settings, get_settings


def run(*args: str, **env: str) -> tuple[int, str]:
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, list(args), env=env)
    finally:
        get_settings.cache_clear()
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.mark.parametrize("args", [("worker",), ("serve", "--role", "api")])
def test_separate_roles_refuse_sqlite(tmp_path: Path, args: tuple[str, ...]) -> None:
    code, output = run(*args, CBIR_DATA_DIR=str(tmp_path), CBIR_DATABASE_URL="")
    assert code != 0
    assert "PostgreSQL" in output and "CBIR_DATABASE_URL" in output


@pytest.mark.parametrize("args", [("worker",), ("serve", "--role", "api")])
def test_separate_roles_refuse_in_process_faiss(tmp_path: Path, args: tuple[str, ...]) -> None:
    url = "postgresql+psycopg://nobody:x@127.0.0.1:1/none"  # refused before any connection
    code, output = run(*args, CBIR_DATA_DIR=str(tmp_path), CBIR_DATABASE_URL=url)
    assert code != 0
    assert "CBIR_VECTOR_STORE" in output


def test_shared_parts_are_enough(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://u:p@db:5432/cbir",
        vector_store="milvus://milvus:19530",
    )
    assert shared_parts_problem(settings) is None
    assert shared_parts_problem(settings.model_copy(update={"database_url": ""})) is not None


def test_the_role_setting(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).role == "all"
    assert Settings(data_dir=tmp_path, role="api").role == "api"
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, role="worker")  # a worker is `cbir worker`, not a serve role


def test_a_worker_refuses_read_only_and_an_unwritable_heartbeat(tmp_path: Path) -> None:
    shared = {
        "CBIR_DATA_DIR": str(tmp_path),
        "CBIR_DATABASE_URL": "postgresql+psycopg://nobody:x@127.0.0.1:1/none",  # refused before use
        "CBIR_VECTOR_STORE": "milvus://127.0.0.1:1",
    }
    code, output = run("worker", **shared, CBIR_READ_ONLY="true")
    assert code != 0 and "CBIR_READ_ONLY" in output
    code, output = run("worker", "--heartbeat", str(tmp_path / "missing" / "alive"), **shared)
    assert code != 0 and "--heartbeat" in output and "No such file" in output
