"""An embedder followed by a PCA-whitening fitted on one collection's codes (compressed codes).

The whitening file (npz: mean, projection, base_version) is a per-collection artefact recorded
like a checkpoint; the wrapped embedder's vectors are projected, then L2-normalised again. It
composes a model (``models``) with the index's post-processing (``index.rerank``), which know
nothing of each other, so it lives here.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from index.rerank import Whitening
from models.base import Embedder


def save_whitening(path: Path, *, whitening: Whitening, base_version: str, fit_id: str) -> str:
    """Write the artefact atomically; returns its SHA-256. ``fit_id`` names this fit, so two fits of
    the same codes (another collection, a refit) are distinct artefacts with distinct versions."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        mean=whitening.mean,
        projection=whitening.projection,
        base_version=np.asarray(base_version),
        fit_id=np.asarray(fit_id),
    )
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def load_whitening(path: Path) -> tuple[Whitening, str, str]:
    """(whitening, base version, SHA-256 of the file); ValueError when the file is not one."""
    data = path.read_bytes()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            whitening = Whitening(
                archive["mean"].astype(np.float32), archive["projection"].astype(np.float32)
            )
            base_version = str(archive["base_version"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a whitening file: {exc}") from None
    return whitening, base_version, hashlib.sha256(data).hexdigest()


def whitened_version(base_version: str, *, dim: int, sha256: str) -> str:
    return f"{base_version}+w{dim}-{sha256[:8]}"


class WhitenedEmbedder(Embedder):
    """``base`` then the whitening: same preprocessing, ``dim`` = the whitening's dims."""

    def __init__(self, *, base: Embedder, path: Path) -> None:
        super().__init__(device=base.device)
        self.base = base
        self.whitening, base_version, sha = load_whitening(path)
        if base_version != base.version:
            raise ValueError(
                f"whitening {path.name} was fitted on {base_version} codes, not {base.version}; refit it"
            )
        self.name = base.name
        self.dim = self.whitening.dim
        self.version = whitened_version(base.version, dim=self.dim, sha256=sha)

    def preprocess(self, image: Image.Image) -> Any:
        return self.base.preprocess(image)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        codes = self.base.embed_batch(batch)
        return torch.from_numpy(self.whitening.apply(codes))

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.whitening.apply(self.base.embed_prepared(items))

    def describe(self) -> dict[str, object]:
        return {**self.base.describe(), "dim": self.dim, "version": self.version, "whitening": self.dim}
