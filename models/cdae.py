"""Convolutional denoising autoencoder (CDAE): unsupervised training, checkpoints, embedder.

The encoder's code is the image's vector. Training never sees a label: the network learns to
reconstruct the clean image from a corrupted one, and the corruptions are the changes that
retrieval should ignore (the default: noise, blur, contrast, small shifts, zooms and tilts; the
``strokes`` preset adds the handwriting ones, elastic wobble and missing strokes), so the code
keeps what the image *is* and drops how it was taken. The default appends the image's top
principal components to the learned code, so what an invariance drops is not lost entirely.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.base import Embedder
from models.cdae_config import CDAEConfig
from models.checkpoints import read_checkpoint, write_checkpoint
from models.corruptions import corrupt
from models.registry import EmbedderSpec, register

__all__ = ["CDAE", "CDAEConfig", "CDAEEmbedder", "corrupt", "epochs_for", "train_cdae"]

CHECKPOINT_FORMAT = "cbir-cdae"
CHECKPOINT_VERSION = 1


class CDAE(nn.Module):
    """Conv encoder (conv-relu-pool per stage) -> code -> mirrored decoder with upsampling.

    Input and output are (n, C, H, W) floats in [0, 1]; ``encode`` gives (n, code_dim).
    """

    def __init__(self, config: CDAEConfig) -> None:
        super().__init__()
        self.config = config
        chans = [config.channels, *config.encoder_channels]
        sizes = [config.image_size]
        for _ in config.encoder_channels:
            sizes.append(math.ceil(sizes[-1] / 2))  # pool with padding: 7 -> 4, as in Keras
        self._sizes = sizes
        self._map_shape = (chans[-1], sizes[-1], sizes[-1])
        flat = chans[-1] * sizes[-1] * sizes[-1]

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            return [*layers, nn.ReLU()]

        self.encoder_stages = nn.ModuleList(
            nn.Sequential(*conv(a, b)) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.to_code = nn.Linear(flat, config.code_dim) if config.code_dim else None
        self.from_code = (
            nn.Sequential(nn.Linear(config.code_dim, flat), nn.ReLU()) if config.code_dim else None
        )
        # Mirror: conv back through the encoder's widths, upsampling to its exact sizes.
        # Tutorial: conv 8 @4 -> up 7, conv 8 -> up 14, conv 16 -> up 28, conv 1 + sigmoid.
        dec = chans[::-1]  # e.g. 8, 8, 16, 1
        pairs = [(dec[0], dec[0]), *zip(dec[:-2], dec[1:-1], strict=True)]
        self.decoder_stages = nn.ModuleList(nn.Sequential(*conv(a, b)) for a, b in pairs)
        self.head = nn.Conv2d(dec[-2], config.channels, 3, padding=1)

    @property
    def code_dim(self) -> int:
        return self.config.code_dim or int(np.prod(self._map_shape))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.encoder_stages:
            x = F.max_pool2d(stage(x), 2, ceil_mode=True)
        x = x.flatten(1)
        return self.to_code(x) if self.to_code is not None else x

    def decode_logits(self, code: torch.Tensor) -> torch.Tensor:
        x = self.from_code(code) if self.from_code is not None else code
        x = x.reshape(-1, *self._map_shape)
        # One conv at the code's resolution, then conv after each upsampling step.
        for stage, size in zip(self.decoder_stages, self._sizes[-2::-1], strict=True):
            x = F.interpolate(stage(x), size=(size, size), mode="nearest")
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(self.encode(x)))


def _consistency_loss(z1: torch.Tensor, z2: torch.Tensor, *, config: CDAEConfig) -> torch.Tensor:
    """Label-free agreement between the codes of two corruptions of the same images."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    if config.consistency == "cosine":
        return (1 - (z1 * z2).sum(1)).mean()
    if config.consistency == "nt_xent":
        # SimCLR's NT-Xent: each view must pick its partner out of the 2n - 1 other codes.
        z = torch.cat([z1, z2])
        logits = z @ z.T / config.temperature
        logits.fill_diagonal_(float("-inf"))
        n = z1.shape[0]
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        return F.cross_entropy(logits, partner)
    raise ValueError(f"unknown consistency {config.consistency!r}; use cosine or nt_xent")


@dataclass
class TrainResult:
    model: CDAE  # in eval mode, on the training device
    losses: list[float]  # mean training loss per epoch
    epoch_seconds: list[float]  # wall time per epoch
    whitening: dict[str, torch.Tensor] | None = None  # {"mean": (d,), "matrix": (d, k)}
    pixel_pca: dict[str, torch.Tensor] | None = None  # {"mean": (p,), "matrix": (p, k)}, p pixels


def epochs_for(config: CDAEConfig, *, images: int, epochs: int | None = None) -> int:
    """Epochs to train on ``images`` images: ``epochs`` when given, else the config's, raised so
    that at least ``config.min_steps`` batches are seen (a few hundred images still train)."""
    if epochs is not None:
        return epochs
    steps = max(1, math.ceil(images / config.batch_size))
    return max(config.epochs, math.ceil(config.min_steps / steps))


def _as_batch(images: torch.Tensor, config: CDAEConfig) -> torch.Tensor:
    """uint8 (n, H, W) or (n, H, W, C) -> float (n, C, H, W) in [0, 1]."""
    x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def train_cdae(
    images: np.ndarray,
    *,
    config: CDAEConfig,
    epochs: int,
    device: torch.device,
    seed: int = 0,
    progress: Callable[[int, int, int, float], None] | None = None,
) -> TrainResult:
    """Train a CDAE on ``images``: uint8 (n, H, W) greyscale at ``config.image_size``, or
    (n, H, W, C) when ``config.channels`` is C > 1 (build them with ``prepare_image``).

    Unsupervised: the loss only compares reconstructions with the clean inputs (and, with
    ``consistency_weight``, the codes of two corruptions of the same image). Deterministic
    given ``seed`` on one machine. ``progress(epoch, step, steps, loss)`` is called after
    every step (1-based epoch and step).
    """
    images = np.asarray(images)
    size, channels = config.image_size, config.channels
    expected = (size, size) if channels == 1 else (size, size, channels)
    if images.dtype != np.uint8 or images.shape[1:] != expected or len(images) == 0:
        raise ValueError(
            f"images must be non-empty uint8 (n, {', '.join(map(str, expected))}), "
            f"got {images.dtype} {images.shape}"
        )
    data = torch.from_numpy(images.copy()).to(device)  # tens of MB: all of it on the device

    with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG state
        torch.manual_seed(seed)
        # channels_last: the tiny-channel convs run about twice as fast on CPU (oneDNN).
        model = CDAE(config).to(device).to(memory_format=torch.channels_last)
    shuffle_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)

    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    elif config.optimizer == "adadelta":
        opt = torch.optim.Adadelta(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use adam or adadelta")
    steps = math.ceil(len(data) / config.batch_size)
    total_steps = max(1, epochs * steps)
    two_views = config.consistency_weight > 0

    losses: list[float] = []
    epoch_seconds: list[float] = []
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(data), generator=shuffle_gen).to(device)
        running = 0.0
        for step in range(1, steps + 1):
            if config.cosine_schedule:
                done = ((epoch - 1) * steps + step - 1) / total_steps
                for group in opt.param_groups:
                    group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * done))
            batch = order[(step - 1) * config.batch_size : step * config.batch_size]
            clean = _as_batch(data[batch], config).contiguous(memory_format=torch.channels_last)
            target = torch.cat([clean, clean]) if two_views else clean
            code = model.encode(corrupt(target, config=config, generator=noise_gen))
            loss = F.binary_cross_entropy_with_logits(model.decode_logits(code), target)
            if two_views:
                z1, z2 = code.chunk(2)
                loss = loss + config.consistency_weight * _consistency_loss(z1, z2, config=config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            running += value
            if progress is not None:
                progress(epoch, step, steps, value)
        losses.append(running / steps)
        epoch_seconds.append(time.perf_counter() - started)

    model.eval()
    whitening = fit_whitening(model, data, config=config) if config.whiten else None
    pixel_pca = fit_pixel_pca(data, config=config) if config.pixel_pca_dims > 0 else None
    return TrainResult(
        model=model, losses=losses, epoch_seconds=epoch_seconds, whitening=whitening, pixel_pca=pixel_pca
    )


@torch.inference_mode()
def encode_images(
    model: CDAE, images: torch.Tensor, *, config: CDAEConfig, batch_size: int = 1024
) -> torch.Tensor:
    """uint8 (n, H, W) tensor -> (n, code_dim) float32 raw codes (eval mode, model's device)."""
    device = next(model.parameters()).device
    out = [
        model.encode(_as_batch(images[i : i + batch_size].to(device), config))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).float()


PCA_SAMPLE = 20_000  # images the pixel PCA is fitted on at most (evenly spaced)


def fit_pixel_pca(images: torch.Tensor, *, config: CDAEConfig) -> dict[str, torch.Tensor]:
    """Principal components of the training images' pixels in [0, 1]: {"mean": (p,), "matrix": (p, k)}."""
    step = max(1, len(images) // PCA_SAMPLE)
    x = _as_batch(images[::step].cpu(), config).flatten(1).double()
    mean = x.mean(0)
    centred = x - mean
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred)  # ascending; (p, p) whatever n is
    keep = max(1, min(config.pixel_pca_dims, x.shape[1], len(x) - 1))
    return {"mean": mean.float(), "matrix": eigvecs.flip(1)[:, :keep].contiguous().float()}


def served_codes(
    model: CDAE,
    batch: torch.Tensor,
    *,
    config: CDAEConfig,
    whitening: dict[str, torch.Tensor] | None,
    pixel_pca: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """A float (n, C, H, W) batch in [0, 1] -> the vectors the embedder L2-normalises: the
    (whitened) code, followed by the weighted unit PCA part when the checkpoint has one."""
    code = apply_whitening(model.encode(batch), whitening)
    if pixel_pca is None:
        return code
    linear = (batch.flatten(1) - pixel_pca["mean"].to(batch.device)) @ pixel_pca["matrix"].to(batch.device)
    return torch.cat([F.normalize(code, dim=1), config.pixel_pca_weight * F.normalize(linear, dim=1)], 1)


@torch.inference_mode()
def embed_uint8(
    result: TrainResult, images: torch.Tensor, *, config: CDAEConfig, batch_size: int = 1024
) -> torch.Tensor:
    """uint8 (n, H, W) images -> (n, d) float32 vectors as served (before the L2 normalisation)."""
    device = next(result.model.parameters()).device
    out = [
        served_codes(
            result.model,
            _as_batch(images[i : i + batch_size].to(device), config),
            config=config,
            whitening=result.whitening,
            pixel_pca=result.pixel_pca,
        )
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).float()


def fit_whitening(model: CDAE, images: torch.Tensor, *, config: CDAEConfig) -> dict[str, torch.Tensor]:
    """PCA-whitening of the L2-normalised clean-image codes: {"mean": (d,), "matrix": (d, k)}.

    Fitted on the training images' own codes, no labels: it rescales the code so that
    every direction of variation counts equally in the cosine, not just the loudest ones.
    """
    codes = F.normalize(encode_images(model, images, config=config), dim=1).double().cpu()
    mean = codes.mean(0)
    cov = torch.cov((codes - mean).T)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    keep = config.whiten_dims or len(eigvals)
    eigvals = eigvals[:keep] + config.whiten_shrinkage * eigvals.mean() + 1e-12
    matrix = eigvecs[:, :keep] / eigvals.sqrt()
    return {"mean": mean.float(), "matrix": matrix.float()}


def apply_whitening(codes: torch.Tensor, whitening: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Raw codes (n, d) -> what the embedder L2-normalises: whitened codes, or the codes."""
    if whitening is None:
        return codes
    mean = whitening["mean"].to(codes.device)
    matrix = whitening["matrix"].to(codes.device)
    return (F.normalize(codes, dim=1) - mean) @ matrix


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    result: TrainResult,
    config: CDAEConfig,
    dataset: dict[str, Any],
) -> str:
    """Write a self-describing checkpoint atomically; return the file's SHA-256 hex.

    The file is written to a temporary name in the same folder, flushed and fsynced, then
    renamed over ``path``: a crash leaves the old file or the new one, never a torn one.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "dataset": dict(dataset),
        "losses": [float(x) for x in result.losses],
        "epoch_seconds": [float(x) for x in result.epoch_seconds],
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "whitening": (
            {k: v.detach().cpu() for k, v in result.whitening.items()}
            if result.whitening is not None
            else None
        ),
        "pixel_pca": (
            {k: v.detach().cpu() for k, v in result.pixel_pca.items()}
            if result.pixel_pca is not None
            else None
        ),
    }
    return write_checkpoint(path, payload)


def _read_checkpoint(data: bytes, *, source: str) -> tuple[CDAE, dict[str, Any]]:
    payload = read_checkpoint(
        data, source=source, kind="CDAE", fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION
    )
    try:
        config = CDAEConfig.from_dict(payload["config"])
        model = CDAE(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{source} has an inconsistent CDAE checkpoint: {exc}") from exc
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["config"] = config
    return model, meta


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[CDAE, dict[str, Any]]:
    """Read a checkpoint -> (model on CPU in eval mode, meta).

    ``meta`` holds the ``CDAEConfig`` under "config", "whitening" (tensors or None), the
    per-epoch "losses", "dataset", "created_at" and "sha256" of the file. A corrupted or
    foreign file raises ``ValueError``.
    """
    data = Path(path).read_bytes()
    model, meta = _read_checkpoint(data, source=str(path))
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return model, meta


def prepare_image(image: Image.Image, *, config: CDAEConfig) -> np.ndarray:
    """A decoded PIL image -> uint8 (H, W) (greyscale) or (H, W, 3) at ``config.image_size``.

    Use it to build the training array too, so training and queries see the same pixels.
    """
    image = image.convert("L" if config.channels == 1 else "RGB")
    size = (config.image_size, config.image_size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays


class CDAEEmbedder(Embedder):
    """The encoder of a trained CDAE checkpoint; the code (whitened if fitted) is the vector."""

    name = "cdae"

    def __init__(self, *, checkpoint: Path, device: torch.device | None = None) -> None:
        super().__init__(device=device)
        data = Path(checkpoint).read_bytes()  # hash and weights from the same bytes
        self._model, meta = _read_checkpoint(data, source=str(checkpoint))
        self.config: CDAEConfig = meta["config"]
        self._whitening: dict[str, torch.Tensor] | None = meta["whitening"]
        self._pixel_pca: dict[str, torch.Tensor] | None = meta.get("pixel_pca")  # older files: none
        self.meta = meta
        self.checkpoint = Path(checkpoint)
        self.version = "cdae-" + hashlib.sha256(data).hexdigest()[:12]
        self.dim = self._whitening["matrix"].shape[1] if self._whitening else self._model.code_dim
        if self._pixel_pca is not None:
            self.dim += self._pixel_pca["matrix"].shape[1]

    def _load(self) -> None:
        self._model.to(self.device).eval()
        if self._whitening is not None:
            self._whitening = {k: v.to(self.device) for k, v in self._whitening.items()}
        if self._pixel_pca is not None:
            self._pixel_pca = {k: v.to(self.device) for k, v in self._pixel_pca.items()}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(prepare_image(image, config=self.config))
        return _as_batch(pixels[None], self.config)[0]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return served_codes(
            self._model, batch, config=self.config, whitening=self._whitening, pixel_pca=self._pixel_pca
        )

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "checkpoint": str(self.checkpoint),
            "whitened": self._whitening is not None,
            "pixel_pca_dims": 0 if self._pixel_pca is None else int(self._pixel_pca["matrix"].shape[1]),
            "image_size": self.config.image_size,
            "channels": self.config.channels,
        }


register(
    EmbedderSpec(
        name="cdae",
        factory=CDAEEmbedder,
        description="convolutional denoising autoencoder trained on the collection (unsupervised)",
        trainable=True,
    )
)
