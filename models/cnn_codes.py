"""How a CNN's activations become a code: the options of the spec string, the views of an image
(crop or whole, sizes, flip) and the pooling of convolutional maps (average, MAC, GeM, R-MAC).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.cnn_archs import Arch

POOLINGS = ("avg", "max", "gem", "rmac")
INPUTS = ("crop", "whole")
NATIVE = "native"  # sizes=native: input=whole at the weights' own resize side
MAX_ASPECT = 4  # longer side at most this many times the shorter side's target (panoramas)


# -- options ---------------------------------------------------------------------------------------
OPTION_HELP: dict[str, tuple[str, str]] = {
    "pooling": ("avg", "avg, max (MAC), gem or rmac (regional MAC), for convolutional map layers"),
    "p": ("3", "GeM exponent (1 = average, larger approaches max)"),
    "input": ("crop", "crop: the weights' resize and centre crop; whole: uncropped, aspect kept"),
    "sizes": (
        "",
        "input=whole: shorter side(s) in pixels joined by '+', e.g. 224+320; native: the weights' "
        "resize side (the default where none is given)",
    ),
    "flip": ("0", "1: average the codes of the image and its mirror image"),
}


@dataclass(frozen=True)
class CodeOptions:
    layer: str
    pooling: str = "avg"
    p: float = 3.0  # GeM exponent: 1 is average pooling, large values approach max pooling
    input: str = "crop"
    sizes: tuple[int, ...] = ()  # shorter sides for input=whole; empty: the weights' resize size
    flip: bool = False

    def key(self) -> str:
        sizes = "+".join(str(s) for s in self.sizes)
        return (
            f"layer={self.layer},pooling={self.pooling},p={self.p:g},input={self.input},"
            f"sizes={sizes},flip={int(self.flip)}"
        )


def _parse_bool(value: str, name: str) -> bool:
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


def parse_options(arch: Arch, raw: dict[str, str]) -> CodeOptions:
    """Option strings -> CodeOptions, checked against the architecture (ValueError when wrong);
    an option not given takes the architecture's default (``Arch.defaults``, else ``OPTION_HELP``)."""
    default = {**{k: v for k, (v, _) in OPTION_HELP.items()}, **arch.defaults}
    layer = raw.get("layer", arch.default_layer)
    if layer not in arch.layers:
        raise ValueError(f"layer must be one of {', '.join(arch.layers)}, got {layer!r}")
    pooling = raw.get("pooling", default["pooling"])
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    try:
        p = float(raw.get("p", "3"))
    except ValueError:
        raise ValueError(f"p must be a number, got {raw['p']!r}") from None
    if not 1.0 <= p <= 16.0:
        raise ValueError(f"p must be between 1 and 16, got {p:g}")
    kind = raw.get("input", default["input"])
    if kind not in INPUTS:
        raise ValueError(f"input must be crop or whole, got {kind!r}")
    # The default sizes apply to input=whole only: input=crop alone means the weights' crop.
    text = raw.get("sizes", default["sizes"] if kind == "whole" else "")
    if "sizes" in raw and kind != "whole" and text != default["sizes"]:
        raise ValueError("sizes applies to input=whole only")
    sizes: tuple[int, ...] = ()  # empty: the weights' resize side
    if kind == "whole" and text and text != NATIVE:
        try:
            sizes = tuple(int(s) for s in text.split("+"))
        except ValueError:
            raise ValueError(f"sizes must be integers joined by '+' (or {NATIVE}), got {text!r}") from None
        if not sizes or len(sizes) > 4 or any(not arch.min_side <= s <= 1024 for s in sizes):
            raise ValueError(f"sizes takes one to four shorter sides between {arch.min_side} and 1024 pixels")
    flip = _parse_bool(raw.get("flip", "0"), "flip")
    return CodeOptions(layer=layer, pooling=pooling, p=p, input=kind, sizes=sizes, flip=flip)


# -- pooling ---------------------------------------------------------------------------------------
def pool(maps: torch.Tensor, *, how: str, p: float) -> torch.Tensor:
    """(n, C, h, w) -> (n, C): average, max (MAC), generalised mean (GeM) or R-MAC over the grid."""
    if how == "avg":
        return maps.mean(dim=(2, 3))
    if how == "max":
        return maps.amax(dim=(2, 3))
    if how == "rmac":
        return rmac(maps)
    return maps.clamp_min(1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def rmac_regions(height: int, width: int, *, levels: int = 3) -> list[tuple[int, int, int]]:
    """Square regions (top, left, side) of R-MAC (Tolias et al. 2016): at level l, squares of side
    2 * min(h, w) / (l + 1), l across the shorter side and l + 1 along the longer one, evenly spaced."""
    regions = []
    short = min(height, width)
    for level in range(1, levels + 1):
        side = max(1, round(2 * short / (level + 1)))
        rows = level + (1 if height > width else 0)
        cols = level + (1 if width > height else 0)
        tops = np.linspace(0, height - side, rows) if height > side else [0.0]
        lefts = np.linspace(0, width - side, cols) if width > side else [0.0]
        regions += [(round(t), round(left), side) for t in tops for left in lefts]
    return list(dict.fromkeys(regions))


def rmac(maps: torch.Tensor, *, levels: int = 3) -> torch.Tensor:
    """Regional maximum activations: each region max-pooled and L2-normalised, then summed."""
    total = torch.zeros(maps.shape[:2], dtype=maps.dtype, device=maps.device)
    for top, left, side in rmac_regions(maps.shape[2], maps.shape[3], levels=levels):
        region = maps[:, :, top : top + side, left : left + side].amax(dim=(2, 3))
        total = total + region / region.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return total


# -- views -----------------------------------------------------------------------------------------
def shorter_size(width: int, height: int, size: int, *, min_side: int = 1) -> tuple[int, int]:
    """(width, height) with the shorter side at ``size``, aspect kept. A panorama whose longer side
    would pass ``MAX_ASPECT * size`` is scaled to that instead (aspect still kept, so no huge
    tensor), but its shorter side never goes below ``min_side``; only beyond that is the longer
    side squeezed."""
    short, long = min(width, height), max(width, height)
    scale = size / short
    cap = MAX_ASPECT * size
    if long * scale > cap:
        scale = max(cap / long, min(size, min_side) / short)
    return (min(cap, max(1, round(width * scale))), min(cap, max(1, round(height * scale))))


# Pillow's filters that torch's antialiased uint8 kernels compute the same way (values within one
# grey level of Pillow's: its fixed-point rounding), four times faster on a CPU.
TORCH_FILTERS = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


def pixels_of(image: Image.Image) -> torch.Tensor:
    """An RGB image as uint8 (3, H, W), channels-last in memory (a view of one copy of its bytes)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int], resample: Image.Resampling) -> torch.Tensor:
    """uint8 (3, H, W) resized to ``size`` (width, height) with Pillow's filter ``resample``,
    antialiased as Pillow does; by torch where it has the same kernel, else by Pillow."""
    width, height = size
    if (height, width) == tuple(pixels.shape[1:]):
        return pixels
    mode = TORCH_FILTERS.get(resample)
    if mode is None:
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        return pixels_of(image.resize(size, resample))
    out = torch.nn.functional.interpolate(
        pixels.unsqueeze(0), size=(height, width), mode=mode, antialias=True, align_corners=False
    )
    return out[0]


def centre_aspect(pixels: torch.Tensor, ratio: int) -> torch.Tensor:
    """The central part of (3, H, W) pixels whose longer side is at most ``ratio`` times the shorter."""
    height, width = pixels.shape[1:]
    if width > ratio * height:
        left = (width - ratio * height) // 2
        return pixels[:, :, left : left + ratio * height]
    if height > ratio * width:
        top = (height - ratio * width) // 2
        return pixels[:, top : top + ratio * width, :]
    return pixels
