"""The ``cbir`` command line: collections and imports, with clean errors instead of tracebacks."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from app.cli import main
from app.settings import get_settings
from tests.conftest import DATASETS_DIR


@pytest.fixture
def cli(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Result]]:
    """Run ``cbir ARGS`` against a fresh data folder and database; settings are re-read for every
    invocation."""
    env = {
        "CBIR_DATA_DIR": str(tmp_path / "data"),
        "CBIR_DATABASE_URL": database_url,
        "CBIR_DATASETS_DIR": str(DATASETS_DIR),
        "CBIR_DEFAULT_EMBEDDER": "tiny",
        "CBIR_DEVICE": "cpu",
    }
    threads = torch.get_num_threads()

    def invoke(*args: str, **overrides: str) -> Result:
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(main, list(args), env={**env, **overrides})
        finally:
            get_settings.cache_clear()

    yield invoke
    torch.set_num_threads(threads)  # `import` uses every core; leave the process as we found it


def assert_clean_failure(result: Result, *fragments: str) -> None:
    """A non-zero exit with a one-line message, not an escaped exception."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def tmp_files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "data" / "tmp"
    return list(folder.iterdir()) if folder.exists() else []


def test_create_then_list_collections(cli: Callable[..., Result]):
    created = cli("collections", "create", "shapes", "--embedder", "tiny")
    assert created.exit_code == 0, created.output
    assert created.stdout.strip() == "created shapes (tiny)"
    assert cli("collections", "create", "digits", "--embedder", "cdae").exit_code == 0

    listed = cli("collections", "list")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines() == [
        "digits\tcdae\tuntrained\t0 images\t0 indexed",
        "shapes\ttiny\ttiny-v1\t0 images\t0 indexed",
    ]


def test_create_uses_the_default_embedder(cli: Callable[..., Result]):
    assert cli("collections", "create", "plain").stdout.strip() == "created plain (tiny)"


def test_duplicate_collection_fails_cleanly(cli: Callable[..., Result]):
    cli("collections", "create", "shapes")
    assert_clean_failure(cli("collections", "create", "shapes"), "already exists")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("collections", "create", "Bad Name"), "invalid"),
        (("collections", "create", "x", "--embedder", "resnet9000"), "resnet9000"),
    ],
)
def test_invalid_collection_fails_cleanly(cli: Callable[..., Result], args: tuple[str, ...], message: str):
    assert_clean_failure(cli(*args), message)


def test_unknown_default_embedder_fails_cleanly_at_start(cli: Callable[..., Result]):
    assert_clean_failure(cli("collections", "list", CBIR_DEFAULT_EMBEDDER="bogus"), "bogus")


def test_invalid_setting_fails_cleanly(cli: Callable[..., Result]):
    assert_clean_failure(cli("collections", "list", CBIR_MAX_K="lots"), "max_k")


@pytest.mark.timeout(120)
def test_import_mnist_test_prints_exact_counts(cli: Callable[..., Result]):
    cli("collections", "create", "digits", "--embedder", "tiny")
    result = cli("import", "mnist:test", "--collection", "digits")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("succeeded; 10000 added, 0 duplicates, 0 failed")
    listed = cli("collections", "list")
    assert listed.stdout.strip() == "digits\ttiny\ttiny-v1\t10000 images\t10000 indexed"


def test_import_of_a_zip_file_prints_counts_and_keeps_the_original(
    cli: Callable[..., Result], tmp_path: Path, make_png: Callable[..., bytes]
):
    archive = tmp_path / "photos.zip"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i in range(3):
            zf.writestr(f"cat/{i}.png", make_png(i))
        zf.writestr("dog/broken.png", b"not an image")
    archive.write_bytes(out.getvalue())
    cli("collections", "create", "pets")

    first = cli("import", str(archive), "--collection", "pets")
    assert first.exit_code == 0, first.output
    assert first.stdout.strip().endswith("succeeded; 3 added, 0 duplicates, 1 failed")
    again = cli("import", str(archive), "--collection", "pets")
    assert again.stdout.strip().endswith("succeeded; 0 added, 3 duplicates, 1 failed")

    assert archive.read_bytes() == out.getvalue()
    assert tmp_files(tmp_path) == []


def test_import_into_unknown_collection_fails_cleanly(
    cli: Callable[..., Result], tmp_path: Path, make_png: Callable[..., bytes]
):
    assert_clean_failure(cli("import", "mnist:test", "--collection", "nope"), "no collection named 'nope'")
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/0.png", make_png(0))
    assert_clean_failure(cli("import", str(archive), "--collection", "nope"), "nope")
    assert tmp_files(tmp_path) == []


def test_import_of_a_file_that_is_not_an_archive_fails_cleanly(cli: Callable[..., Result], tmp_path: Path):
    cli("collections", "create", "pets")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_clean_failure(cli("import", str(text), "--collection", "pets"), "not a zip or tar archive")
    assert tmp_files(tmp_path) == []


@pytest.mark.parametrize(
    ("source", "message"), [("imagenet:test", "unknown dataset"), ("mnist:validation", "splits")]
)
def test_import_of_an_unknown_dataset_fails_cleanly(cli: Callable[..., Result], source: str, message: str):
    cli("collections", "create", "digits")
    assert_clean_failure(cli("import", source, "--collection", "digits"), message)


def test_import_requires_a_collection(cli: Callable[..., Result]):
    result = cli("import", "mnist:test")
    assert result.exit_code == 2 and "--collection" in result.stderr
