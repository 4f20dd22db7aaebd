"""The CDAE's training corruptions: what retrieval should ignore, drawn per image on the device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.cdae_config import CDAEConfig


def corrupt(x: torch.Tensor, *, config: CDAEConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, C, H, W) clean batch in [0, 1] -> a corrupted copy, each image its own draw.

    Order: mirror, geometry (one affine warp plus an elastic field, one resampling), blur,
    contrast and brightness, erasing, then Gaussian noise clipped to [0, 1]. ``generator`` lives
    on ``x.device``.
    """
    n, _, h, w = x.shape

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, generator=generator, device=x.device) * 2 - 1

    c = config
    if c.flip_prob:
        flip = torch.rand(n, generator=generator, device=x.device) < c.flip_prob
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if c.rotate_degrees or c.shift_pixels or c.scale_range or c.elastic_pixels:
        angle = uniform(n) * math.radians(c.rotate_degrees)
        scale = 1 + uniform(n) * c.scale_range
        # affine_grid maps output to input coordinates in [-1, 1]: 1 pixel = 2 / size.
        shift = uniform(n, 2) * c.shift_pixels * 2 / torch.tensor([w, h], device=x.device)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        if c.elastic_pixels:
            # A coarse 4x4 random field, upsampled smoothly: strokes bend, they do not shatter.
            coarse = torch.randn(n, 2, 4, 4, generator=generator, device=x.device)
            field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
            per_axis = c.elastic_pixels * 2 / torch.tensor([w, h], device=x.device)
            field = field * per_axis[:, None, None]
            grid = grid + field.permute(0, 2, 3, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if c.blur_sigma:
        sigma = torch.rand(n, generator=generator, device=x.device) * c.blur_sigma
        x = _blur(x, sigma=sigma).clamp(0.0, 1.0)  # float sums may land a hair past 1
    if c.contrast or c.brightness:
        factor = 1 + uniform(n) * c.contrast
        shift = uniform(n) * c.brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor[:, None, None, None] + mean + shift[:, None, None, None]).clamp(0.0, 1.0)
    if c.erase_prob:
        area = 0.02 + 0.18 * torch.rand(n, generator=generator, device=x.device)
        aspect = torch.exp(uniform(n) * math.log(3))
        eh = (torch.sqrt(area * aspect) * h).clamp(1, h)
        ew = (torch.sqrt(area / aspect) * w).clamp(1, w)
        top = torch.rand(n, generator=generator, device=x.device) * (h - eh)
        left = torch.rand(n, generator=generator, device=x.device) * (w - ew)
        erase = torch.rand(n, generator=generator, device=x.device) < c.erase_prob
        ys = torch.arange(h, device=x.device)[None, :, None]
        xs = torch.arange(w, device=x.device)[None, None, :]
        box = (
            (ys >= top[:, None, None])
            & (ys < (top + eh)[:, None, None])
            & (xs >= left[:, None, None])
            & (xs < (left + ew)[:, None, None])
            & erase[:, None, None]
        )
        x = x.masked_fill(box[:, None], 0.0)
    if c.noise_factor:
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        x = (x + c.noise_factor * noise).clamp(0.0, 1.0)
    return x


def _blur(x: torch.Tensor, *, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (n, C, H, W) with one std per image (0 leaves it as it is)."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    weights = weights / weights.sum(1, keepdim=True)  # (n, 2r + 1); sigma ~0 -> a delta
    n, ch, h, w = x.shape
    flat = x.reshape(1, n * ch, h, w)
    kernel = weights.repeat_interleave(ch, 0)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * ch
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * ch
    )
    return flat.reshape(n, ch, h, w)
