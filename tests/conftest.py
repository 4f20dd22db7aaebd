"""Shared fixtures: every test gets its own data folder, database and index files.

The database is a SQLite file in the data folder, or, when ``CBIR_TEST_DATABASE_URL`` names a
PostgreSQL database, a fresh schema in it (``tests/postgres.py``). Tests marked ``pg`` need
PostgreSQL-only behaviour (concurrent writers, dropped connections) and are skipped on SQLite.

The PostgreSQL pass of ``make test`` runs only the tests that reach the test database (those
that ask for ``database_url``, directly or through ``settings``, ``ctx``, ``client``, ...): every
other test would run exactly as it did in the SQLite pass, so it is deselected there.

What is expensive to build and only read is built once per session: the MNIST demo
(``demo_build``, ``tests/demo.py``) and the torchvision checkpoints (``cnn_weights``).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine

from app.context import AppContext, open_context
from app.core.settings import Settings
from app.main import create_app
from tests import demo, postgres
from tests.milvus_server import milvus_uri  # noqa: F401 -- a session fixture shared by every Milvus test

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS_DIR = Path(os.environ.get("CBIR_DATASETS_DIR", SHARED_DATASETS))
TEST_DATABASE_URL = os.environ.get("CBIR_TEST_DATABASE_URL", "")
ON_POSTGRES = postgres.is_postgres(TEST_DATABASE_URL)

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    if TEST_DATABASE_URL and not ON_POSTGRES:
        raise pytest.UsageError(
            f"CBIR_TEST_DATABASE_URL must be a postgresql+psycopg:// URL or empty (SQLite), not "
            f"{postgres.redact(TEST_DATABASE_URL)}"
        )


def pytest_report_header() -> str:
    if ON_POSTGRES:
        return f"cbir test database: PostgreSQL at {postgres.redact(TEST_DATABASE_URL)}, a schema per test"
    return "cbir test database: SQLite, a file per test"


# A test that asks for none of these (directly or through another fixture: ``settings``, ``ctx``,
# ``client``, ...) never reaches the test database.
DATABASE_FIXTURES = frozenset({"database_url", "pg_schema", "pg_admin"})


def reaches_test_database(item: pytest.Item) -> bool:
    fixtures = getattr(item, "fixturenames", ())
    return bool(DATABASE_FIXTURES.intersection(fixtures)) or item.get_closest_marker("pg") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL, deselect the tests that never reach the test database: the SQLite pass ran
    them already, identically (model, index and imaging tests; servers on SQLite data folders;
    the browser tests). With ``CBIR_TEST_SERVER_DATABASE_URL`` set, the live servers of the
    reliability tests use that database, so then nothing is deselected."""
    if not ON_POSTGRES or os.environ.get("CBIR_TEST_SERVER_DATABASE_URL"):
        return
    kept = [item for item in items if reaches_test_database(item)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if not reaches_test_database(item)])
        items[:] = kept


# The tests that use the session's demo build (``demo_build``): one xdist worker runs them all.
DEMO_TESTS = ("tests/browser/", "tests/learning/test_demo.py::")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """pytest-xdist's default ``--dist load`` (``make test`` runs ``-n 2``): every test is a work
    unit of its own except ``DEMO_TESTS``, one unit, so that a session builds the demo once, not
    once per worker. (xdist's own ``--dist loadgroup`` marks do not group under pytest 9.)"""
    if config.getvalue("dist") != "load":  # another --dist asked for by name
        return None
    from xdist.scheduler import LoadScopeScheduling

    class DemoGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "demo" if nodeid.startswith(DEMO_TESTS) else nodeid

    return DemoGroupScheduling(config, log)  # type: ignore[arg-type]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("pg") and not ON_POSTGRES:
        pytest.skip("needs PostgreSQL: set CBIR_TEST_DATABASE_URL (make test does when one is reachable)")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """Autocommit connections to the test PostgreSQL database (``pg`` tests and schema set-up)."""
    if not ON_POSTGRES:
        pytest.skip("needs PostgreSQL")
    engine = postgres.admin_engine(TEST_DATABASE_URL)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_schema(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """This test's own PostgreSQL schema (None on SQLite): created empty, dropped afterwards."""
    if not ON_POSTGRES:
        yield None
        return
    admin: Engine = request.getfixturevalue("pg_admin")
    schema = postgres.new_schema(admin)
    yield schema
    postgres.drop_schema(admin, schema)


@pytest.fixture
def database_url(pg_schema: str | None) -> str:
    """The test's database: "" (a SQLite file in the data folder) or its PostgreSQL schema's URL."""
    return postgres.schema_url(TEST_DATABASE_URL, pg_schema) if pg_schema else ""


# Big torchvision checkpoints (hundreds of MB, seconds to build): their tests are marked slow.
BIG_CNNS = frozenset({"alexnet", "vgg16", "resnet152", "inception_v3"})


def write_cnn_checkpoint(name: str, folder: Path, *, seed: int = 0) -> Path:
    """A random-init state dict of torchvision architecture ``name``, saved in ``folder`` under the
    file name torchvision's pretrained weights have (what ``CBIR_WEIGHTS_DIR`` must hold); the real
    files' layout, auxiliary classifiers included. Same seed, same bytes."""
    from torchvision import models as tvm

    from models import cnn

    path = folder / cnn.ARCHS[name].weights().file_name
    extra = {"init_weights": True} if name in {"googlenet", "inception_v3"} else {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(tvm, name)(weights=None, **extra)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def cnn_weights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``cnn_weights("resnet18")`` -> a weights folder holding that architecture's checkpoint
    (``write_cnn_checkpoint``), written once per session, removed at its end (up to 1.4 GB);
    efficientnet_lite0 ships its own."""
    folder = tmp_path_factory.mktemp("cnn-weights")

    def ensure(name: str) -> Path:
        from models import cnn

        weights = cnn.ARCHS[name].weights()
        if weights.url is not None and not (folder / weights.file_name).is_file():
            write_cnn_checkpoint(name, folder)
        return folder

    yield ensure
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite data folder holding the MNIST demo collection ``mnist`` (`cbir demo`, one epoch),
    built once per session. Read only: a test that serves or changes it works on
    ``demo.copy_data(demo_build, its_folder)``."""
    cache = os.environ.get("CBIR_BROWSER_DEMO_CACHE")
    build = Path(cache).resolve() if cache else tmp_path_factory.mktemp("demo-build") / "data"
    demo.build_demo(build, datasets_dir=DATASETS_DIR, log=tmp_path_factory.mktemp("demo-log") / "demo.log")
    return build


@pytest.fixture
def torch_hub_dir(tmp_path: Path) -> Iterator[Path]:
    """torch.hub's folder (its ``checkpoints/`` cache) moved to an empty temporary folder, so a
    weights file cached on this machine cannot hide a missing one."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield tmp_path / "torch-hub"
    torch.hub.set_dir(previous)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        datasets_dir=DATASETS_DIR,
        default_embedder="tiny",
        max_upload_bytes=2 * 1024 * 1024,
        max_archive_bytes=20 * 1024 * 1024,
        max_pixels=4_000_000,
        max_side=4096,
        # Imports decode in threads here: a fresh data folder per test would start fresh worker
        # processes per test. tests/ingest/test_pipeline_processes.py and the kill -9 test (a real
        # server) run the worker processes.
        import_processes=False,
        # The auto runtime choice (an ONNX export and seconds of timing per embedder and data folder)
        # is tested where it is the subject: tests/api/test_cnn_collections.py, tests/models.
        cnn_runtime="torch",
    )


@pytest.fixture
def ctx(settings: Settings) -> Iterator[AppContext]:
    """The service's context without the HTTP layer (what the CLI and the app both build)."""
    context = open_context(settings)
    yield context
    context.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def collection(client: TestClient) -> str:
    """A collection with the fast deterministic ``tiny`` embedder (8x8 greyscale, 64-d)."""
    response = client.post("/api/v1/collections", json={"name": "shapes", "embedder": "tiny"})
    assert response.status_code == 201, response.text
    return "shapes"


def encode(image: Image.Image, image_format: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **params)
    return out.getvalue()


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    """PNG bytes of a seeded random pattern: the same seed gives the same bytes."""

    def factory(seed: int = 0, *, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
        rng = np.random.default_rng(seed)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode=mode)
        return encode(image)

    return factory
