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
from app.core.settings import get_settings
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
    assert "succeeded; 10000 added, 0 duplicates, 0 failed (" in result.stdout
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
    assert "succeeded; 3 added, 0 duplicates, 1 failed (" in first.stdout
    again = cli("import", str(archive), "--collection", "pets")
    assert "succeeded; 0 added, 3 duplicates, 1 failed (" in again.stdout

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


def labelled_digits_zip(path: Path, count: int) -> Path:
    """A zip of the first ``count`` real MNIST training digits, one folder per label."""
    import numpy as np
    from PIL import Image

    from app.ingest.sources.datasets import load_mnist

    images, labels = load_mnist("train", datasets_dir=DATASETS_DIR, download_dir=path.parent)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            out = io.BytesIO()
            Image.fromarray(np.array(images[i])).save(out, format="PNG")
            zf.writestr(f"{labels[i]}/{i}.png", out.getvalue())
    return path


def test_train_classifier_switches_the_collection_to_lenet5(cli: Callable[..., Result], tmp_path: Path):
    cli("collections", "create", "digits", "--embedder", "cdae")
    archive = labelled_digits_zip(tmp_path / "digits.zip", 200)
    assert cli("import", str(archive), "--collection", "digits").exit_code == 0

    result = cli("train", "classifier", "--collection", "digits", "--arch", "lenet5", "--epochs", "2")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith("checkpoint 1: lenet5-") and "(lenet5, 2 epochs, final loss" in line
    assert line.endswith("[active]")
    assert "epoch 2" in result.stderr  # one progress bar per epoch
    listed = cli("collections", "list").stdout.strip().split("\t")
    assert listed[:2] == ["digits", "lenet5"] and listed[2].startswith("lenet5-")
    assert listed[3:] == ["200 images", "200 indexed"]

    recorded = cli("train", "classifier", "--collection", "digits", "--epochs", "1", "--no-activate")
    assert recorded.exit_code == 0, recorded.output
    assert recorded.stdout.strip().startswith("checkpoint 2: lenet5-")
    assert not recorded.stdout.strip().endswith("[active]")
    assert cli("collections", "list").stdout.strip().split("\t")[2] == listed[2]


def test_train_classifier_refuses_unlabelled_collections_and_unknown_archs(
    cli: Callable[..., Result], tmp_path: Path, make_png: Callable[..., bytes]
):
    cli("collections", "create", "plain", "--embedder", "cdae")
    archive = tmp_path / "flat.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"{i}.png", make_png(i))  # no folder: no label
    assert cli("import", str(archive), "--collection", "plain").exit_code == 0
    assert_clean_failure(cli("train", "classifier", "--collection", "plain"), "has no labels")

    unknown = cli("train", "classifier", "--collection", "plain", "--arch", "resnet9000")
    assert unknown.exit_code == 2 and "Invalid value for '--arch'" in unknown.stderr


def test_import_folder_then_eval_with_groundtruth(cli: Callable[..., Result], tmp_path: Path) -> None:
    import json

    from tests.holidays import holidays_subset

    truth = holidays_subset(tmp_path / "photos")
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    assert cli("collections", "create", "holidays", "--embedder", "tiny").exit_code == 0
    imported = cli("import", str(tmp_path / "photos"), "--collection", "holidays")
    assert imported.exit_code == 0, imported.output
    assert "3 duplicates, 0 failed" in imported.stdout
    result = cli(
        "eval", "--collection", "holidays", "--groundtruth", str(tmp_path / "gt.json"),
        "--embedder", "tiny", "--embedder", "pixels", "--qe", "0", "--qe", "1",
        "--whiten", "0", "--whiten", "8", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tiny +whiten8 +qe1" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["groundtruth"].endswith("gt.json")
    rows = report["results"]
    assert len(rows) == 8 and {r["embedder"] for r in rows} == {"tiny", "pixels"}
    assert all(r["queries"] == len(truth) and {"p_at_10", "map_at_10", "map_all"} <= r.keys() for r in rows)
    refused = cli("eval", "--collection", "holidays", "--qe", "1")
    assert_clean_failure(refused, "--groundtruth")


def test_collection_tuning_commands(cli: Callable[..., Result], tmp_path: Path) -> None:
    from tests.holidays import holidays_subset

    holidays_subset(tmp_path / "photos")
    cli("collections", "create", "holidays", "--embedder", "tiny")
    cli("import", str(tmp_path / "photos"), "--collection", "holidays")
    whitened = cli("collections", "whiten", "holidays", "--dim", "16")
    assert whitened.exit_code == 0, whitened.output
    assert "+w16-" in whitened.stdout
    options = cli("collections", "search-options", "holidays", "--qe", "2")
    assert options.stdout.strip() == "holidays: qe=2 qe_alpha=3"
    assert_clean_failure(cli("collections", "search-options", "holidays", "--qe", "99"), "qe must be")
    assert_clean_failure(cli("collections", "whiten", "holidays", "--dim", "4096"), "needs at least")


def test_train_lenet5_is_the_classifier_command_under_the_embedder_name(cli: Callable[..., Result]) -> None:
    assert_clean_failure(cli("train", "lenet5", "--collection", "missing"), "no collection named 'missing'")


def test_reembed_switches_the_collection_and_refuses_what_it_cannot(
    cli: Callable[..., Result], tmp_path: Path, make_png: Callable[..., bytes]
):
    folder = tmp_path / "pets"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(make_png(i))
    cli("collections", "create", "pets", "--embedder", "tiny")
    assert cli("import", str(folder), "--collection", "pets").exit_code == 0

    switched = cli("collections", "reembed", "pets", "--embedder", "pixels")
    assert switched.exit_code == 0, switched.output
    assert "succeeded; 4 images embedded with pixels" in switched.stdout
    listed = cli("collections", "list")
    assert listed.stdout.strip().split("\t")[:2] == ["pets", "pixels"]

    again = cli("collections", "reembed", "pets", "--embedder", "pixels")
    assert again.exit_code != 0 and "already serves" in again.output
    trainable = cli("collections", "reembed", "pets", "--embedder", "cdae")
    assert trainable.exit_code != 0 and "cbir train" in trainable.output
