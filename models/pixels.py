"""Raw-pixel embedders: the retrieval baseline, and a tiny fast embedder for tests."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from models.base import Embedder
from models.registry import EmbedderSpec, register


class PixelEmbedder(Embedder):
    """Greyscale pixels resized to ``size`` x ``size``, flattened and L2-normalised (cosine)."""

    def __init__(self, *, size: int, name: str, device: torch.device | None = None) -> None:
        super().__init__(device=device)
        self.size = size
        self.name = name
        self.dim = size * size
        self.version = f"{name}-v1"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        grey = image.convert("L")
        if grey.size != (self.size, self.size):
            grey = grey.resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = np.asarray(grey, dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).unsqueeze(0)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.flatten(1)


register(
    EmbedderSpec(
        name="pixels",
        factory=lambda device=None: PixelEmbedder(size=28, name="pixels", device=device),
        description="raw greyscale pixels at 28x28 (784-d), the baseline every learned code must beat",
    )
)
register(
    EmbedderSpec(
        name="tiny",
        factory=lambda device=None: PixelEmbedder(size=8, name="tiny", device=device),
        description="greyscale 8x8 thumbnail (64-d): deterministic and fast, for tests and smoke runs",
    )
)
