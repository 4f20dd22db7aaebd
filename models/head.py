"""A pretrained CNN's head fine-tuned on a collection's labels: ``cbir train classifier --arch head``.

The backbone stays frozen: the collection's pretrained codes (one L2-normalised vector per image,
exactly what the CNN embedder serves) are computed once, and a small head learns on them: a
linear projection to ``dim`` dimensions followed by LeNet-5's scaled-cosine classifier with an
additive margin (``models.lenet_net.CosineClassifier``), trained with AdamW for a few epochs over the
codes (seconds). The L2-normalised projection becomes the collection's code; the embedder
(``cnn_head``) is the base CNN embedder followed by that projection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.base import Embedder
from models.checkpoints import config_from_dict, read_checkpoint, write_checkpoint
from models.classifier import ClassifierArch, register_arch
from models.lenet_net import CosineClassifier
from models.lenet_training import train_epochs
from models.registry import EmbedderSpec, create, register

EMBEDDER_NAME = "cnn_head"
CHECKPOINT_FORMAT = "cbir-cnn-head"
CHECKPOINT_VERSION = 1


@dataclass
class HeadConfig:
    dim: int = 128  # the code's dimensions (the projection's outputs)
    cosine_scale: float = 16.0  # as LeNet-5's default preset
    cosine_margin: float = 0.35
    lr: float = 3e-3
    weight_decay: float = 5e-4
    batch_size: int = 256
    epochs: int = 30  # over the codes only: well under a second per epoch for thousands of images

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        return config_from_dict(cls, data, what="head")


class ProjectionHead(nn.Module):
    """(n, in_dim) base codes -> (n, dim) projection; ``forward`` gives the cosine logits."""

    def __init__(self, in_dim: int, config: HeadConfig, *, num_classes: int) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, config.dim)
        self.output = CosineClassifier(
            config.dim, num_classes, scale=config.cosine_scale, margin=config.cosine_margin
        )

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.projection(codes), labels)


@dataclass
class HeadResult:
    model: ProjectionHead  # eval mode, on the CPU
    config: HeadConfig
    classes: list[str]
    base_spec: str
    base_version: str
    losses: list[float]
    train_accuracy: list[float]
    epoch_seconds: list[float]

    @property
    def recipe(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "base": self.base_spec, "base_version": self.base_version}

    @property
    def metrics(self) -> dict[str, Any]:
        return {
            "epoch_losses": [float(x) for x in self.losses],
            "epoch_train_accuracy": [float(x) for x in self.train_accuracy],
            "epoch_seconds": [float(x) for x in self.epoch_seconds],
        }

    def project(self, codes: np.ndarray) -> np.ndarray:
        weight, bias = _weights(self.model)
        return project(codes, weight, bias)

    def save(self, path: str | os.PathLike[str], *, dataset: dict[str, Any]) -> str:
        return write_checkpoint(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "arch": EMBEDDER_NAME,
                "base": self.base_spec,
                "base_version": self.base_version,
                "config": self.config.to_dict(),
                "classes": list(self.classes),
                "dataset": dict(dataset),
                **self.metrics,
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            },
        )


def _weights(model: ProjectionHead) -> tuple[np.ndarray, np.ndarray]:
    linear = model.projection
    return (
        linear.weight.detach().cpu().numpy().astype(np.float32),
        linear.bias.detach().cpu().numpy().astype(np.float32),
    )


def project(codes: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(n, in_dim) codes -> (n, dim) float32, rows L2-normalised (a zero row stays zero)."""
    out = np.asarray(codes, dtype=np.float32) @ weight.T + bias
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def train_head(
    codes: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str],
    base_spec: str,
    base_version: str,
    config: HeadConfig | None = None,
    epochs: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> HeadResult:
    """Train the projection and cosine classifier on (n, in_dim) float32 ``codes`` and int (n,)
    ``labels`` (indices into ``classes``). Deterministic given ``seed``; runs on the CPU (the
    codes are small), whatever ``device`` says."""
    del device
    config = config or HeadConfig()
    codes, labels = np.asarray(codes, dtype=np.float32), np.asarray(labels)
    if codes.ndim != 2 or len(codes) == 0:
        raise ValueError(f"codes must be a non-empty (n, d) array, got {codes.shape}")
    if labels.shape != (len(codes),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, one per code, got {labels.dtype} {labels.shape}")
    if len(classes) < 2 or labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels must index {len(classes)} classes (at least 2)")
    epochs = config.epochs if epochs is None else epochs
    data = torch.from_numpy(codes.copy())
    targets = torch.from_numpy(labels.astype(np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ProjectionHead(codes.shape[1], config, num_classes=len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(len(data) / config.batch_size)
    shuffle_gen = torch.Generator().manual_seed(seed)
    losses, accuracy, seconds = train_epochs(
        model,
        data=data,
        targets=targets,
        epochs=epochs,
        steps=steps,
        batch_size=config.batch_size,
        opt=opt,
        shuffle=shuffle_gen,
        progress=progress,
    )
    return HeadResult(
        model=model,
        config=config,
        classes=[str(c) for c in classes],
        base_spec=base_spec,
        base_version=base_version,
        losses=losses,
        train_accuracy=accuracy,
        epoch_seconds=seconds,
    )


def read_head_checkpoint(data: bytes, *, source: str) -> dict[str, Any]:
    """Checkpoint bytes -> meta with "weight", "bias" (numpy), "base", "base_version", "config"
    (a HeadConfig), "classes"; ValueError for a torn, foreign or inconsistent file."""
    payload = read_checkpoint(
        data, source=source, kind="CNN head", fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION
    )
    try:
        config = HeadConfig.from_dict(payload["config"])
        classes = [str(c) for c in payload["classes"]]
        state = payload["state_dict"]
        model = ProjectionHead(int(state["projection.weight"].shape[1]), config, num_classes=len(classes))
        model.load_state_dict(state)
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        meta["base"], meta["base_version"] = str(payload["base"]), str(payload["base_version"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{source} has an inconsistent CNN head checkpoint: {exc}") from exc
    meta["weight"], meta["bias"] = _weights(model)
    meta["config"], meta["classes"] = config, classes
    return meta


class HeadEmbedder(Embedder):
    """A pretrained CNN embedder (``base``, frozen) followed by the trained projection."""

    name = EMBEDDER_NAME

    def __init__(
        self, *, checkpoint: Path, device: torch.device | None = None, base: Embedder | None = None
    ) -> None:
        super().__init__(device=device)
        data = Path(checkpoint).read_bytes()
        meta = read_head_checkpoint(data, source=str(checkpoint))
        if base is None:  # outside the service (EmbedderCache passes one built with its settings)
            base = create(meta["base"], device=device)
        if base.version != meta["base_version"]:
            raise ValueError(
                f"CNN head {Path(checkpoint).name} was trained on {meta['base_version']} codes, "
                f"not {base.version} ({meta['base']}); retrain it with `cbir train classifier --arch head`"
            )
        self.base = base
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.config: HeadConfig = meta["config"]
        self._weight, self._bias = meta["weight"], meta["bias"]
        self.dim = int(self._weight.shape[0])
        self.checkpoint = Path(checkpoint)
        self.version = f"{EMBEDDER_NAME}-" + hashlib.sha256(data).hexdigest()[:12]

    def _load(self) -> None:
        self.base.load()

    def preprocess(self, image: Image.Image) -> Any:
        return self.base.preprocess(image)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(project(self.base.embed_batch(batch), self._weight, self._bias))

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return project(self.base.embed_prepared(items), self._weight, self._bias)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "base": self.meta["base"],
            "base_version": self.meta["base_version"],
            "checkpoint": str(self.checkpoint),
            "classes": list(self.classes),
        }


def _not_pixels(image: Image.Image) -> np.ndarray:
    raise NotImplementedError("the head arch trains on the base embedder's codes, not on pixels")


_ARCH_CONFIG = HeadConfig()  # what `cbir train classifier --arch head` trains


def _train_arch(
    codes: np.ndarray, labels: np.ndarray, *, dim: int | None = None, **kwargs: Any
) -> HeadResult:
    config = _ARCH_CONFIG if dim is None else dataclasses.replace(_ARCH_CONFIG, dim=dim)
    return train_head(codes, labels, config=config, **kwargs)


register(
    EmbedderSpec(
        name=EMBEDDER_NAME,
        factory=HeadEmbedder,
        description="a pretrained CNN's codes through a projection trained on the collection's labels",
        trainable=True,
    )
)
register_arch(
    ClassifierArch(
        name="head",
        embedder=EMBEDDER_NAME,
        description="a linear head (cosine margin) on a frozen pretrained CNN's codes",
        preset="default",
        default_epochs=_ARCH_CONFIG.epochs,
        prepare=_not_pixels,
        train=_train_arch,
        on_codes=True,
    )
)
