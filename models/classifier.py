"""Classifier architectures that ``cbir train classifier --arch NAME`` trains on a collection's labels.

An arch turns labelled images into a checkpoint of one trainable embedder (``embedder``), whose
codes become the collection's vectors. LeNet-5 from scratch (``models/lenet.py``) is the first;
an arch from pixels registers its own ``prepare`` (the embedder's preprocessing, as a uint8
array), ``train`` and result with ``save``. ``head`` (``models/head.py``) trains on a frozen
pretrained CNN's codes instead (``on_codes``). Each arch's module calls ``register_arch`` when
``models`` is imported; this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image


class TrainedClassifier(Protocol):
    """What an arch's ``train`` returns: metrics to record and a way to write the checkpoint."""

    classes: list[str]

    @property
    def recipe(self) -> dict[str, Any]: ...  # JSON: the training config, recorded with the checkpoint

    @property
    def metrics(self) -> dict[str, Any]: ...  # JSON: per-epoch "epoch_losses", "epoch_seconds", ...

    def save(self, path: Path, *, dataset: dict[str, Any]) -> str: ...  # atomic; returns SHA-256


@dataclass(frozen=True)
class ClassifierArch:
    name: str  # the --arch value
    embedder: str  # the registered trainable embedder that reads the checkpoints it writes
    description: str
    preset: str  # the training recipe it uses, recorded with each checkpoint
    default_epochs: int
    # a decoded image -> its uint8 training array (exactly the embedder's preprocessing)
    prepare: Callable[[Image.Image], np.ndarray]
    # (images (n, ...) uint8, labels (n,) int indices into classes, *, classes, epochs (None: the
    # recipe's), seed, device, progress(epoch, step, steps, loss)) -> a TrainedClassifier
    train: Callable[..., TrainedClassifier]
    # True: the arch trains on a pretrained embedder's codes instead of pixels (``prepare`` is not
    # used): ``train(codes (n, d) float32, labels, *, classes, base_spec, base_version, dim,
    # epochs, seed, device, progress)``, and its result has ``project(codes)`` -> the new codes
    on_codes: bool = False


_ARCHS: dict[str, ClassifierArch] = {}


def register_arch(arch: ClassifierArch) -> ClassifierArch:
    if arch.name in _ARCHS:
        raise ValueError(f"classifier arch {arch.name!r} is already registered")
    _ARCHS[arch.name] = arch
    return arch


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def get_arch(name: str) -> ClassifierArch:
    try:
        return _ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown classifier arch {name!r}; known: {', '.join(sorted(_ARCHS))}") from None
