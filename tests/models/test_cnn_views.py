"""The CNN views are resized by torch's antialiased uint8 kernels: the pixels of Pillow's filters
(within a grey level or two on a few pixels: their rounding), so the codes and the embedder version
stay those of Pillow's resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.cnn_codes import centre_aspect, pixels_of, resize_pixels, shorter_size
from tests.conftest import DATASETS_DIR

HOLIDAYS = DATASETS_DIR / "inria-holidays-dev" / "jpg"


def photos() -> list[Image.Image]:
    names = sorted(HOLIDAYS.glob("*.jpg"))[:6]
    if not names:
        pytest.skip(f"no photos in {HOLIDAYS}")
    return [Image.open(path).convert("RGB") for path in names]


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
@pytest.mark.parametrize("side", [97, 224, 288, 512])  # down and up
def test_torch_resize_gives_pillows_pixels(resample: Image.Resampling, side: int) -> None:
    for image in photos():
        size = shorter_size(*image.size, side)
        expected = np.asarray(image.resize(size, resample), dtype=np.int16)
        got = resize_pixels(pixels_of(image), size, resample).permute(1, 2, 0).numpy().astype(np.int16)
        assert got.shape == expected.shape
        difference = np.abs(got - expected)
        # one grey level (two where bicubic enlarges), and on very few pixels
        assert difference.max() <= 2, f"{side} px: {difference.max()} grey levels from Pillow"
        assert difference.mean() < 0.01, f"{side} px: {difference.mean():.4f} grey levels on average"


def test_a_filter_torch_lacks_is_pillows_own() -> None:
    image = photos()[0]
    got = resize_pixels(pixels_of(image), (50, 40), Image.Resampling.LANCZOS)
    expected = np.asarray(image.resize((50, 40), Image.Resampling.LANCZOS))
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def test_pixels_are_channels_last_views_and_the_centre_is_cut() -> None:
    image = Image.new("RGB", (100, 10), (1, 2, 3))
    pixels = pixels_of(image)
    assert pixels.shape == (3, 10, 100) and pixels.dtype == torch.uint8
    assert pixels.stride() == (1, 300, 3)  # one copy of the bytes, not a transposed one
    assert centre_aspect(pixels, 4).shape == (3, 10, 40)
    assert centre_aspect(pixels_of(Image.new("L", (10, 100))), 4).shape == (3, 40, 10)
