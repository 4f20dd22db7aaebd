"""The embedder contract: a batch of images in, L2-normalised float32 rows out."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


def l2_normalise(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-normalise a (n, d) tensor; an all-zero row stays zero instead of becoming NaN."""
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(eps)


class Embedder(ABC):
    """Turns images into vectors for one collection.

    ``preprocess`` runs per image (safe to call from worker threads); ``embed_batch``
    runs the network on a stacked batch. ``version`` changes whenever the vectors
    would change (weights, preprocessing), so stored embeddings are keyed by it.
    """

    name: str
    dim: int
    version: str

    def __init__(self, *, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self._load_lock = threading.Lock()
        self._loaded = False

    def load(self) -> None:
        """Idempotent, thread-safe lazy load of weights onto the device."""
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    def _load(self) -> None:  # noqa: B027 - optional hook
        """Load weights; embedders without weights need nothing."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Any:
        """One decoded PIL image -> its prepared form, exactly as at index time: a (C, H, W)
        float32 tensor here; embedders with several views per image return a list of them."""

    @abstractmethod
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) on ``self.device`` -> (n, dim) raw codes."""

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """(n, C, H, W) preprocessed tensor -> (n, dim) float32, rows L2-normalised."""
        self.load()
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        codes = self._forward(batch.to(self.device, non_blocking=True))
        codes = l2_normalise(codes.float().reshape(codes.shape[0], -1))
        return codes.cpu().numpy().astype(np.float32, copy=False)

    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        """Prepared items -> one (n, C, H, W) batch."""
        return torch.stack(list(items))

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """What ``preprocess`` returned for n images -> (n, dim) float32, rows L2-normalised."""
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_batch(self.collate(items))

    def embed(self, images: Sequence[Image.Image], *, batch_size: int = 256) -> np.ndarray:
        """Decoded images -> (n, dim) float32, rows L2-normalised."""
        out = [
            self.embed_prepared([self.preprocess(im) for im in images[i : i + batch_size]])
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    # Embedders that can compute their codes in more than one runtime (models/cnn.py) override these.
    @property
    def runtime_pending(self) -> bool:
        """True while a runtime choice waits for ``prepare_runtime()``."""
        return False

    def prepare_runtime(self) -> None:  # noqa: B027 - optional hook
        """Choose the runtime (may export and time a model: never inside a request)."""

    def runtime_info(self) -> dict[str, object] | None:
        """What computes the codes (requested, active, state, reason, measured images/s), if chosen
        among runtimes; None otherwise."""
        return None

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "dim": self.dim, "version": self.version}
