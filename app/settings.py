"""Service settings: one class, read from ``CBIR_*`` environment variables, never at import time."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CBIR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("./var")
    # Empty means a SQLite file in data_dir; any SQLAlchemy URL selects another database.
    database_url: str = ""
    # Where MNIST (and other datasets) are read from; missing files are downloaded with torchvision.
    datasets_dir: Path | None = None
    device: str = "auto"
    # One torch thread per serving process is the robust choice on small shared machines (FACTS.md).
    torch_threads: int = Field(1, ge=1)
    default_embedder: str = "cdae"
    # Server folders that POST /collections/{name}/imports {"folder": ...} may read, separated by
    # os.pathsep (":" on Linux); empty turns folder imports over HTTP off.
    import_roots: str = ""
    # Pretrained CNN weights: looked for here first, then in the torch hub cache, then downloaded.
    weights_dir: Path | None = None
    weights_download: bool = True
    # Where CNN codes are computed on the CPU: torch, onnx (ONNX Runtime, exports cached in
    # data_dir/onnx, torch when export or check fails) or auto (onnx where measured faster).
    cnn_runtime: Literal["torch", "onnx", "auto"] = "torch"

    # Input limits, enforced before and during decoding.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_archive_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_side: int = Field(16_384, ge=1)
    max_k: int = Field(100, ge=1)
    # Index rebuilds of at most this many vectors run in the request that needs them (exact
    # search builds in well under a second); larger ones run in the background, with 503s
    # (Retry-After) from that collection's searches until the new index serves.
    index_sync_rebuild_max: int = Field(50_000, ge=0)

    # Demo collection built by `cbir demo` / `make run`.
    demo_collection: str = "mnist"
    demo_epochs: int = Field(0, ge=0)  # 0: the CDAE preset's recommended epoch count
    embed_batch_size: int = Field(256, ge=1)
    # Bulk imports: images per committed batch, decoding threads, and how many chunks may wait
    # between stages (bounded queues keep memory flat whatever the archive size).
    import_batch_size: int = Field(256, ge=1, le=10_000)
    import_workers: int = Field(0, ge=0, le=64)  # 0: processes: cores - 1; threads: cores, at most 4
    # Decode and embed imports in worker processes on the CPU (threads when off, or on a GPU).
    import_processes: bool = True
    import_queue_depth: int = Field(2, ge=1, le=64)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'cbir.sqlite3'}"

    @property
    def import_root_paths(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.import_roots.split(os.pathsep) if p.strip()]

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def onnx_dir(self) -> Path:
        """ONNX exports of CNN embedders, one file per embedder version (CBIR_CNN_RUNTIME)."""
        return self.data_dir / "onnx"

    @property
    def journal_dir(self) -> Path:
        """Each process's journal of image files written ahead of their commit."""
        return self.data_dir / "journal"

    @property
    def uploads_dir(self) -> Path:
        """Archives and manifests of import jobs, kept until the job ends so it can resume."""
        return self.data_dir / "uploads"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    def ensure_dirs(self) -> None:
        for folder in (self.data_dir, self.images_dir, self.index_dir, self.checkpoints_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
