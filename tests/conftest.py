"""Shared fixtures: every test gets its own data folder, SQLite file and index files."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS_DIR = Path(os.environ.get("CBIR_DATASETS_DIR", SHARED_DATASETS))

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=os.environ.get("CBIR_TEST_DATABASE_URL", ""),
        datasets_dir=DATASETS_DIR,
        default_embedder="tiny",
        max_upload_bytes=2 * 1024 * 1024,
        max_archive_bytes=20 * 1024 * 1024,
        max_pixels=4_000_000,
        max_side=4096,
    )


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
