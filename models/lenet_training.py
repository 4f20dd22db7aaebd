"""Training LeNet-5 on a collection's labels, and its self-describing checkpoints.

``train_epochs`` is the classifier loop LeNet-5 and the CNN head (``models/head.py``) share;
``train_lenet`` is the LeNet-5 recipe around it (optimiser, schedule, augmentation).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import read_checkpoint, write_checkpoint
from models.lenet_net import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    EMBEDDER_NAME,
    LeNet5,
    LeNetConfig,
    as_batch,
)


def random_affine(x: torch.Tensor, *, config: LeNetConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, C, H, W) batch -> each image rotated, shifted and zoomed by its own random draw."""
    c = config
    if not (c.rotate_degrees or c.shift_pixels or c.scale_range):
        return x
    n, _, h, w = x.shape

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, generator=generator, device=x.device) * 2 - 1

    angle = uniform(n) * math.radians(c.rotate_degrees)
    scale = 1 + uniform(n) * c.scale_range
    # affine_grid maps output to input coordinates in [-1, 1]: 1 pixel = 2 / size.
    shift = uniform(n, 2) * c.shift_pixels * 2 / torch.tensor([w, h], device=x.device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class TrainResult:
    model: LeNet5  # in eval mode, on the training device
    config: LeNetConfig
    classes: list[str]  # class names in output order
    losses: list[float]  # mean training loss per epoch
    # per epoch, the fraction of training images classified right while training: augmented, and
    # with the margin against them, so below what the finished network scores
    train_accuracy: list[float]
    epoch_seconds: list[float]

    @property
    def recipe(self) -> dict[str, Any]:
        return self.config.to_dict()

    @property
    def metrics(self) -> dict[str, Any]:
        return {
            "epoch_losses": [float(x) for x in self.losses],
            "epoch_train_accuracy": [float(x) for x in self.train_accuracy],
            "epoch_seconds": [float(x) for x in self.epoch_seconds],
        }

    def save(self, path: str | os.PathLike[str], *, dataset: dict[str, Any]) -> str:
        return save_checkpoint(path, result=self, dataset=dataset)


def train_epochs(
    model: nn.Module,
    *,
    data: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    steps: int,
    batch_size: int,
    opt: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    shuffle: torch.Generator,
    inputs: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    label_smoothing: float = 0.0,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """The classifier loop LeNet-5 and the CNN head share: ``model(x, y)`` gives margin logits.

    Each epoch visits ``steps`` batches of a fresh permutation; returns per-epoch mean loss, train
    accuracy and seconds."""
    losses: list[float] = []
    accuracy: list[float] = []
    seconds: list[float] = []
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(data), generator=shuffle).to(data.device)
        running, correct = 0.0, 0
        for step in range(1, steps + 1):
            batch = order[(step - 1) * batch_size : step * batch_size]
            x, y = inputs(data[batch]), targets[batch]
            logits = model(x, y)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            value = loss.item()
            running += value
            correct += int((logits.argmax(1) == y).sum())
            if progress is not None:
                progress(epoch, step, steps, value)
        losses.append(running / steps)
        accuracy.append(correct / len(data))
        seconds.append(time.perf_counter() - started)
    model.eval()
    return losses, accuracy, seconds


def train_lenet(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str],
    config: LeNetConfig,
    epochs: int | None = None,
    device: torch.device,
    seed: int = 0,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> TrainResult:
    """Train LeNet-5 on uint8 (n, image_size, image_size) greyscale ``images`` (build them with
    ``prepare_image``) and int (n,) ``labels``, indices into ``classes``.

    Deterministic given ``seed`` on one machine. ``progress(epoch, step, steps, loss)`` is
    called after every step (1-based epoch and step).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    size = config.image_size
    if images.dtype != np.uint8 or images.shape[1:] != (size, size) or len(images) == 0:
        raise ValueError(
            f"images must be non-empty uint8 (n, {size}, {size}), got {images.dtype} {images.shape}"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, one per image, got {labels.dtype} {labels.shape}")
    if len(classes) < 2 or labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels must index {len(classes)} classes (at least 2)")
    epochs = config.epochs if epochs is None else epochs
    data = torch.from_numpy(images.copy()).to(device)  # 60,000 digits are 47 MB: all on the device
    targets = torch.from_numpy(labels.astype(np.int64)).to(device)

    with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG state
        torch.manual_seed(seed)
        model = LeNet5(config, num_classes=len(classes)).to(device)
    padded = F.pad(as_batch(data[:10_000]), (config.pad,) * 4)  # a sample is plenty
    model.pixel_mean.fill_(padded.mean().item())
    model.pixel_std.fill_(padded.std().item())

    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use adam or sgd")
    steps = math.ceil(len(data) / config.batch_size)
    if len(data) % config.batch_size == 1 and steps > 1:
        steps -= 1  # batch norm cannot train on a last batch of one image: leave it out this epoch
    total_steps = max(1, epochs * steps)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total_steps)
    elif config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    elif config.schedule != "constant":
        raise ValueError(f"unknown schedule {config.schedule!r}; use constant, cosine or onecycle")
    shuffle_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1)

    losses, accuracy, epoch_seconds = train_epochs(
        model,
        data=data,
        targets=targets,
        epochs=epochs,
        steps=steps,
        batch_size=config.batch_size,
        opt=opt,
        scheduler=scheduler,
        shuffle=shuffle_gen,
        inputs=lambda x: random_affine(as_batch(x), config=config, generator=augment_gen),
        label_smoothing=config.label_smoothing,
        progress=progress,
    )
    return TrainResult(
        model=model,
        config=config,
        classes=[str(c) for c in classes],
        losses=losses,
        train_accuracy=accuracy,
        epoch_seconds=epoch_seconds,
    )


def save_checkpoint(path: str | os.PathLike[str], *, result: TrainResult, dataset: dict[str, Any]) -> str:
    """Write a self-describing checkpoint (config, classes, per-epoch metrics, dataset, weights)
    atomically; return the file's SHA-256 hex."""
    return write_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "arch": EMBEDDER_NAME,
            "config": result.config.to_dict(),
            "classes": list(result.classes),
            "dataset": dict(dataset),
            **result.metrics,
            "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        },
    )


def read_lenet_checkpoint(data: bytes, *, source: str) -> tuple[LeNet5, dict[str, Any]]:
    payload = read_checkpoint(
        data, source=source, kind="LeNet-5", fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION
    )
    try:
        config = LeNetConfig.from_dict(payload["config"])
        classes = [str(c) for c in payload["classes"]]
        model = LeNet5(config, num_classes=len(classes))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{source} has an inconsistent LeNet-5 checkpoint: {exc}") from exc
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["config"], meta["classes"] = config, classes
    return model, meta


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[LeNet5, dict[str, Any]]:
    """Read a checkpoint -> (model on CPU in eval mode, meta).

    ``meta`` holds the ``LeNetConfig`` under "config", "classes", the per-epoch
    "epoch_losses" and "epoch_train_accuracy", "dataset", "created_at" and "sha256" of the file.
    A corrupted or foreign file raises ``ValueError``.
    """
    data = Path(path).read_bytes()
    model, meta = read_lenet_checkpoint(data, source=str(path))
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return model, meta
