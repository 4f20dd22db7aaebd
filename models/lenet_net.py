"""LeNet-5 (LeCun et al. 1998): the network whose F6 layer is the code, its config and its input.

The layer sizes are the paper's (32x32 input, C1 6@5x5, S2, C3 16@5x5, S4, C5 120, F6 84, one
output per class); activations, pooling, normalisation and the classifier are modern choices
(``LeNetConfig``). Training is in ``models/lenet_training.py``, the embedder in ``models/lenet.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.checkpoints import config_from_dict

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


def as_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W) -> float (n, 1, H, W) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255.0)


@torch.inference_mode()
def encode_images(model: LeNet5, images: torch.Tensor, *, batch_size: int = 2048) -> torch.Tensor:
    """uint8 (n, H, W) tensor -> (n, 84) float32 F6 codes, not normalised (eval mode)."""
    device = next(model.parameters()).device
    out = [
        model.features(as_batch(images[i : i + batch_size].to(device)))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).float()


def prepare_image(image: Image.Image, *, config: LeNetConfig) -> np.ndarray:
    """A decoded PIL image -> uint8 (image_size, image_size) greyscale, for training and queries."""
    image = image.convert("L")
    size = (config.image_size, config.image_size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays
