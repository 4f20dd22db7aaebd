"""LeNet-5 (LeCun et al. 1998) trained on a collection's labels; its F6 layer is the code.

Supervised neural codes: the network learns to tell the collection's classes apart, and the
84 activations of F6, the layer before the classifier, become each image's vector. The layer
sizes are the paper's (32x32 input, C1 6@5x5, S2, C3 16@5x5, S4, C5 120, F6 84, one output
per class); activations, pooling, normalisation and the classifier are modern choices, and
the one that matters most for retrieval is the classifier: a scaled-cosine head with a margin
(NormFace / CosFace) makes the classes separate by *angle*, which is what the cosine search
ranks by (``benchmarks/lenet_mnist.py`` has the measurements).

This module is the embedder and the ``lenet5`` classifier arch; the network and its config are
in ``models/lenet_net.py``, training and checkpoints in ``models/lenet_training.py`` (their
public names are importable from here too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.base import Embedder
from models.classifier import ClassifierArch, register_arch
from models.lenet_net import (
    CODE_DIM,
    EMBEDDER_NAME,
    CosineClassifier,
    LeNet5,
    LeNetConfig,
    as_batch,
    encode_images,
    prepare_image,
)
from models.lenet_training import (
    TrainResult,
    load_checkpoint,
    random_affine,
    read_lenet_checkpoint,
    save_checkpoint,
    train_epochs,
    train_lenet,
)
from models.registry import EmbedderSpec, register

__all__ = [
    "CODE_DIM",
    "EMBEDDER_NAME",
    "CosineClassifier",
    "LeNet5",
    "LeNetConfig",
    "LeNetEmbedder",
    "TrainResult",
    "encode_images",
    "load_checkpoint",
    "prepare_image",
    "random_affine",
    "save_checkpoint",
    "train_epochs",
    "train_lenet",
]


class LeNetEmbedder(Embedder):
    """F6 of a trained LeNet-5 checkpoint: 84-d codes."""

    name = EMBEDDER_NAME
    dim = CODE_DIM

    def __init__(self, *, checkpoint: Path, device: torch.device | None = None) -> None:
        super().__init__(device=device)
        data = Path(checkpoint).read_bytes()  # hash and weights from the same bytes
        self._model, meta = read_lenet_checkpoint(data, source=str(checkpoint))
        self.config: LeNetConfig = meta["config"]
        self.classes: list[str] = meta["classes"]
        self.meta = meta
        self.checkpoint = Path(checkpoint)
        self.version = f"{EMBEDDER_NAME}-" + hashlib.sha256(data).hexdigest()[:12]

    def _load(self) -> None:
        self._model.to(self.device).eval()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return as_batch(torch.from_numpy(prepare_image(image, config=self.config))[None])[0]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self._model.features(batch)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "checkpoint": str(self.checkpoint),
            "classes": list(self.classes),
            "image_size": self.config.image_size,
        }


_ARCH_CONFIG = LeNetConfig.preset("default")  # what `cbir train classifier --arch lenet5` trains


def _train_arch(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str],
    epochs: int | None,
    seed: int,
    device: torch.device,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> TrainResult:
    return train_lenet(
        images,
        labels,
        classes=classes,
        config=_ARCH_CONFIG,
        epochs=epochs,
        device=device,
        seed=seed,
        progress=progress,
    )


register(
    EmbedderSpec(
        name=EMBEDDER_NAME,
        factory=LeNetEmbedder,
        description="LeNet-5 trained on the collection's labels; F6 activations (84-d)",
        trainable=True,
    )
)
register_arch(
    ClassifierArch(
        name="lenet5",
        embedder=EMBEDDER_NAME,
        description="LeNet-5 from scratch on 32x32 greyscale (MNIST-sized digits)",
        preset="default",
        default_epochs=_ARCH_CONFIG.epochs,
        prepare=lambda image: prepare_image(image, config=_ARCH_CONFIG),
        train=_train_arch,
    )
)
