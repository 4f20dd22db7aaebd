"""A JPEG decoded no larger than the embedder needs (``min_side``): DCT scaling, sizes kept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.settings import Settings
from app.imaging.decode import ImageLimits, decode_image


def _jpeg(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _limits(tmp_path: Path) -> ImageLimits:
    return ImageLimits.from_settings(Settings(data_dir=tmp_path))


def test_a_large_jpeg_decodes_at_the_smallest_scale_that_keeps_min_side(tmp_path: Path) -> None:
    decoded = decode_image(_jpeg(1600, 1200), limits=_limits(tmp_path), min_side=288)
    assert decoded.image.size == (400, 300)  # 1/4: 1/8 would leave the shorter side at 150
    assert (decoded.width, decoded.height) == (1600, 1200)  # the image's own size, as stored


def test_a_jpeg_under_twice_min_side_and_other_formats_decode_whole(tmp_path: Path) -> None:
    limits = _limits(tmp_path)
    assert decode_image(_jpeg(500, 400), limits=limits, min_side=288).image.size == (500, 400)
    png = io.BytesIO()
    Image.new("RGB", (1600, 1200)).save(png, "PNG")
    assert decode_image(png.getvalue(), limits=limits, min_side=288).image.size == (1600, 1200)
    assert decode_image(_jpeg(1600, 1200), limits=limits).image.size == (1600, 1200)  # no hint
