"""LeNet-5 (LeCun et al. 1998) trained on a collection's labels; its F6 layer is the code.

Supervised neural codes: the network learns to tell the collection's classes apart, and the
84 activations of F6, the layer before the classifier, become each image's vector. The layer
sizes are the paper's (32x32 input, C1 6@5x5, S2, C3 16@5x5, S4, C5 120, F6 84, one output
per class); activations, pooling, normalisation and the classifier are modern choices, and
the one that matters most for retrieval is the classifier: a scaled-cosine head with a margin
(NormFace / CosFace) makes the classes separate by *angle*, which is what the cosine search
ranks by (``benchmarks/lenet_mnist.py`` has the measurements).
"""

from __future__ import annotations

import dataclasses
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
from PIL import Image
from torch import nn

from models.base import Embedder
from models.checkpoints import config_from_dict, read_checkpoint, write_checkpoint
from models.classifier import ClassifierArch, register_arch
from models.registry import EmbedderSpec, register

EMBEDDER_NAME = "lenet5"
CHECKPOINT_FORMAT = "cbir-lenet5"
CHECKPOINT_VERSION = 1
CODE_DIM = 84  # F6


@dataclass
class LeNetConfig:
    """Everything that defines a LeNet-5 run except the classes (those come from the data).

    The defaults are a plain modern LeNet-5 (ReLU, max-pooling, softmax, Adam, 5 epochs), the
    reference the tuned ``LeNetConfig.preset("default")`` is measured against.
    """

    # --- input: greyscale, resized to image_size, zero-padded by pad on every side (28 + 2 * 2
    # = 32, as the paper pads MNIST), then standardised with the training pixels' mean and std
    image_size: int = 28
    pad: int = 2

    # --- network: the sizes are LeNet-5's; these are the choices around them
    activation: str = "relu"  # "relu" or "tanh" (the paper's squashing function)
    pooling: str = "max"  # "max" or "avg" (the paper's subsampling, without its trainable gain)
    batch_norm: bool = False  # after C1, C3, C5 and F6
    head: str = "linear"  # "linear": softmax over a linear layer; "cosine": scaled cosine
    # logits against one unit weight per class (NormFace), with an additive margin (CosFace)
    cosine_scale: float = 16.0  # s: the logits are s * cos; too small and the loss cannot
    # approach 0 with 10 classes, too large and it behaves like an unnormalised softmax
    cosine_margin: float = 0.0  # m: the true class must win by s * m during training
    code_activation: bool = True  # the code is act(F6); False: F6 before its activation

    # --- loss
    label_smoothing: float = 0.0

    # --- augmentation (training only): one random affine warp per image
    rotate_degrees: float = 0.0  # uniform in [-r, r]
    shift_pixels: float = 0.0  # uniform in [-s, s] on each axis
    scale_range: float = 0.0  # uniform zoom in [1 - a, 1 + a]

    # --- optimisation
    optimizer: str = "adam"  # "adam" (AdamW) or "sgd" (Nesterov momentum 0.9)
    lr: float = 1e-3  # the peak learning rate under "onecycle"
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant", "cosine" (to 0) or "onecycle" (warm-up, then down)
    batch_size: int = 128
    epochs: int = 5  # the default for `cbir train classifier`; a training call may override it

    @classmethod
    def preset(cls, name: str) -> LeNetConfig:
        """``"plain"``: the reference; ``"default"``: what cbir trains."""
        if name == "plain":
            return cls()
        if name == "default":
            return cls(**_DEFAULT_PRESET)
        raise ValueError(f"unknown LeNet-5 preset {name!r}; known: plain, default")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeNetConfig:
        return config_from_dict(cls, data, what="LeNet-5")


# cbir's default, chosen by the measurements in benchmarks/lenet_mnist.py (table in its docstring).
# Against the plain reference (5 epochs: P@10 0.988, mAP@all 0.963 on MNIST):
_DEFAULT_PRESET: dict[str, Any] = {
    # Longer, with a one-cycle schedule: the biggest single step (15 epochs: 0.992 / 0.988).
    "epochs": 15,  # about 2-3 minutes on one CPU core for 60,000 digits; 20 gained nothing
    "schedule": "onecycle",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    # Scaled-cosine head with an additive margin on the un-activated F6: the classes separate by
    # angle, which is what search ranks by (mAP@all 0.988 -> 0.994). Without the margin the
    # cosine head is worse than softmax (0.983); 0.35 beat 0.2 on three seeds each.
    "head": "cosine",
    "cosine_scale": 16.0,  # 30 measured the same
    "cosine_margin": 0.35,
    "code_activation": False,
    # Within the seed-to-seed spread on MNIST (+-0.0005), kept because they cost little and
    # make the recipe less fragile on other small greyscale collections.
    "batch_norm": True,
    "rotate_degrees": 10.0,
    "shift_pixels": 2.0,
    "scale_range": 0.1,
}


class CosineClassifier(nn.Module):
    """Scaled cosine logits, ``s * cos(feature, class weight)``; during training the true
    class's cosine is lowered by the margin first (CosFace), so it must win with room to spare."""

    def __init__(self, dim: int, classes: int, *, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) / math.sqrt(dim))
        self.scale = scale
        self.margin = margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T
        if labels is not None and self.margin:
            cosine = cosine - self.margin * F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        return self.scale * cosine


class LeNet5(nn.Module):
    """LeNet-5 over (n, 1, image_size, image_size) floats in [0, 1]; pads and standardises itself.

    ``features`` gives the (n, 84) F6 codes, ``forward`` the (n, classes) logits.
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, config: LeNetConfig, *, num_classes: int) -> None:
        super().__init__()
        if config.activation not in ("relu", "tanh"):
            raise ValueError(f"unknown activation {config.activation!r}; use relu or tanh")
        if config.pooling not in ("max", "avg"):
            raise ValueError(f"unknown pooling {config.pooling!r}; use max or avg")
        if config.head not in ("linear", "cosine"):
            raise ValueError(f"unknown head {config.head!r}; use linear or cosine")
        if config.image_size + 2 * config.pad != 32:
            raise ValueError(
                f"LeNet-5 reads 32x32: image_size + 2 * pad is {config.image_size + 2 * config.pad}"
            )
        self.config = config
        self.num_classes = num_classes

        def act() -> nn.Module:
            return nn.ReLU() if config.activation == "relu" else nn.Tanh()

        def norm(kind: type[nn.Module], channels: int) -> nn.Module:
            return kind(channels) if config.batch_norm else nn.Identity()

        def pool() -> nn.Module:
            return nn.MaxPool2d(2) if config.pooling == "max" else nn.AvgPool2d(2)

        bias = not config.batch_norm  # a bias before batch norm is cancelled by its mean
        # Standardisation travels with the weights: set from the training pixels by train_lenet.
        self.register_buffer("pixel_mean", torch.zeros(()))
        self.register_buffer("pixel_std", torch.ones(()))
        self.c1 = nn.Sequential(nn.Conv2d(1, 6, 5, bias=bias), norm(nn.BatchNorm2d, 6), act())  # 32 -> 28
        self.s2 = pool()  # 28 -> 14
        self.c3 = nn.Sequential(nn.Conv2d(6, 16, 5, bias=bias), norm(nn.BatchNorm2d, 16), act())  # -> 10
        self.s4 = pool()  # 10 -> 5
        self.c5 = nn.Sequential(  # 5x5 conv over the 5x5 maps: 120 units of size 1x1
            nn.Conv2d(16, 120, 5, bias=bias), norm(nn.BatchNorm2d, 120), act(), nn.Flatten()
        )
        self.f6 = nn.Sequential(nn.Linear(120, CODE_DIM, bias=bias), norm(nn.BatchNorm1d, CODE_DIM))
        self.f6_act = act()
        self.output: nn.Module
        if config.head == "cosine":
            self.output = CosineClassifier(
                CODE_DIM, num_classes, scale=config.cosine_scale, margin=config.cosine_margin
            )
        else:
            self.output = nn.Linear(CODE_DIM, num_classes)

    def _trunk(self) -> tuple[tuple[str, nn.Module], ...]:
        return (("C1", self.c1), ("S2", self.s2), ("C3", self.c3), ("S4", self.s4), ("C5", self.c5))

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (F.pad(x, (self.config.pad,) * 4) - self.pixel_mean) / self.pixel_std

    def _code_and_head_input(self, f6: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activated = self.f6_act(f6)
        code = activated if self.config.code_activation else f6
        # The linear head reads the activated F6 (as in the paper); the cosine head reads the
        # code itself, so the angles it shapes are the angles search compares.
        return code, activated if self.config.head == "linear" else code

    def _logits(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.output, CosineClassifier):
            return self.output(features, labels)
        return self.output(features)

    def layer_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's output by the paper's names: input, C1, S2, C3, S4, C5, F6, output."""
        out = {"input": self._standardise(x)}
        previous = out["input"]
        for name, layer in self._trunk():
            previous = out[name] = layer(previous)
        out["F6"], head_input = self._code_and_head_input(self.f6(previous))
        out["output"] = self._logits(head_input, None)
        return out

    def _f6(self, x: torch.Tensor) -> torch.Tensor:
        x = self._standardise(x)
        for _, layer in self._trunk():
            x = layer(x)
        return self.f6(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, H, W) in [0, 1] -> (n, 84) F6 codes (not normalised)."""
        return self._code_and_head_input(self._f6(x))[0]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 1, H, W) in [0, 1] -> (n, classes) logits; ``labels`` applies the training margin."""
        return self._logits(self._code_and_head_input(self._f6(x))[1], labels)


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


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W) -> float (n, 1, H, W) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255.0)


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
    padded = F.pad(_as_batch(data[:10_000]), (config.pad,) * 4)  # a sample is plenty
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
        inputs=lambda x: random_affine(_as_batch(x), config=config, generator=augment_gen),
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


@torch.inference_mode()
def encode_images(model: LeNet5, images: torch.Tensor, *, batch_size: int = 2048) -> torch.Tensor:
    """uint8 (n, H, W) tensor -> (n, 84) float32 F6 codes, not normalised (eval mode)."""
    device = next(model.parameters()).device
    out = [
        model.features(_as_batch(images[i : i + batch_size].to(device)))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).float()


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


def _read_checkpoint(data: bytes, *, source: str) -> tuple[LeNet5, dict[str, Any]]:
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
    model, meta = _read_checkpoint(data, source=str(path))
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return model, meta


def prepare_image(image: Image.Image, *, config: LeNetConfig) -> np.ndarray:
    """A decoded PIL image -> uint8 (image_size, image_size) greyscale, for training and queries."""
    image = image.convert("L")
    size = (config.image_size, config.image_size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays


class LeNetEmbedder(Embedder):
    """F6 of a trained LeNet-5 checkpoint: 84-d codes."""

    name = EMBEDDER_NAME
    dim = CODE_DIM

    def __init__(self, *, checkpoint: Path, device: torch.device | None = None) -> None:
        super().__init__(device=device)
        data = Path(checkpoint).read_bytes()  # hash and weights from the same bytes
        self._model, meta = _read_checkpoint(data, source=str(checkpoint))
        self.config: LeNetConfig = meta["config"]
        self.classes: list[str] = meta["classes"]
        self.meta = meta
        self.checkpoint = Path(checkpoint)
        self.version = f"{EMBEDDER_NAME}-" + hashlib.sha256(data).hexdigest()[:12]

    def _load(self) -> None:
        self._model.to(self.device).eval()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return _as_batch(torch.from_numpy(prepare_image(image, config=self.config))[None])[0]

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
