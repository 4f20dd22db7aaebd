"""Decode memory: the estimate read from headers (app/imaging/decode_cost.py), the JPEG draft over the cap
and the process's byte budget (app/imaging/decode_budget.py)."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from app.core.errors import DecodeMemoryFull, ImageTooLarge
from app.core.memory import default_budget
from app.core.settings import Settings
from app.imaging import decode_cost
from app.imaging.decode import ImageLimits, decode_image, plan_decode
from app.imaging.decode_budget import DecodeBudget
from app.imaging.decode_cost import header_mode, jpeg_draft_scale, peak_bytes


def encode(image: Image.Image, image_format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def png16(width: int, height: int, *, colour_type: int, channels: int) -> bytes:
    raw = bytes((1 + width * channels * 2) * height)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


SAMPLES = {
    "png-1": encode(Image.new("1", (9, 7)), "PNG"),
    "png-L": encode(Image.new("L", (9, 7)), "PNG"),
    "png-I;16": png16(9, 7, colour_type=0, channels=1),
    "png-RGB": encode(Image.new("RGB", (9, 7)), "PNG"),
    "png-RGB16": png16(9, 7, colour_type=2, channels=3),
    "png-P": encode(Image.new("P", (9, 7)), "PNG"),
    "png-LA": encode(Image.new("LA", (9, 7)), "PNG"),
    "png-LA16": png16(9, 7, colour_type=4, channels=2),
    "png-RGBA": encode(Image.new("RGBA", (9, 7)), "PNG"),
    "png-RGBA16": png16(9, 7, colour_type=6, channels=4),
    "jpeg-L": encode(Image.new("L", (9, 7)), "JPEG"),
    "jpeg-RGB": encode(Image.new("RGB", (9, 7)), "JPEG"),
    "jpeg-CMYK": encode(Image.new("CMYK", (9, 7)), "JPEG"),
    "gif": encode(Image.new("P", (9, 7)), "GIF"),
    "webp-RGB": encode(Image.new("RGB", (9, 7)), "WEBP"),
    "webp-RGBA": encode(Image.new("RGBA", (9, 7), (1, 2, 3, 4)), "WEBP"),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_header_mode_is_the_mode_pillow_decodes_to(name: str):
    data = SAMPLES[name]
    with Image.open(io.BytesIO(data)) as image:
        assert header_mode(data, image_format=image.format or "") == image.mode
    plan = plan_decode(data, limits=ImageLimits())
    assert plan is not None and (plan.width, plan.height, plan.scale) == (9, 7, 1)


def test_png_modes_follow_pillows_table():
    assert {key: modes[0] for key, modes in PngImagePlugin._MODES.items()} == decode_cost._PNG_MODES


def test_a_16_bit_rgba_png_costs_what_pillow_holds_for_it_not_what_the_file_stores():
    # Pillow reads 16-bit RGBA samples straight into 8-bit RGBA: the same cost as an 8-bit RGBA.
    assert plan_decode(SAMPLES["png-RGBA16"], limits=ImageLimits()) == plan_decode(
        SAMPLES["png-RGBA"], limits=ImageLimits()
    )
    assert peak_bytes(image_format="PNG", mode="RGBA", width=1000, height=1000) > peak_bytes(
        image_format="PNG", mode="L", width=1000, height=1000
    )


def test_jpeg_over_the_byte_cap_is_decoded_at_a_reduced_scale_and_keeps_its_size():
    pixels = np.random.default_rng(0).integers(0, 256, size=(600, 800, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG")
    full = peak_bytes(image_format="JPEG", mode="RGB", width=800, height=600)
    limits = ImageLimits(max_decode_bytes=full // 3)
    plan = plan_decode(data, limits=limits)
    assert plan is not None and plan.scale == 2 and plan.nbytes <= full // 3
    decoded = decode_image(data, limits=limits)
    assert decoded.image.size == (400, 300) and (decoded.width, decoded.height) == (800, 600)
    # Under the cap nothing changes: the full decode.
    assert decode_image(data, limits=ImageLimits(max_decode_bytes=full)).image.size == (800, 600)
    with pytest.raises(ImageTooLarge, match="CBIR_MAX_DECODE_BYTES"):
        decode_image(data, limits=ImageLimits(max_decode_bytes=full // 100))


def test_png_over_the_byte_cap_is_refused_before_any_pixel_is_decoded():
    data = SAMPLES["png-RGBA16"]
    with pytest.raises(ImageTooLarge, match="bytes"):
        plan_decode(data, limits=ImageLimits(max_decode_bytes=100))


def wait_until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (a slow machine only
    makes it poll longer)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)


def test_a_stored_file_over_the_byte_cap_is_decoded_a_jpeg_still_at_a_reduced_scale():
    stored = ImageLimits(max_decode_bytes=100, refuse_over_decode_bytes=False)
    data = SAMPLES["png-RGBA16"]
    plan = plan_decode(data, limits=stored)
    assert plan is not None and plan.scale == 1 and plan.nbytes > 100
    assert decode_image(data, limits=stored).image.size == (9, 7)
    pixels = np.random.default_rng(0).integers(0, 256, size=(600, 800, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(pixels), "JPEG")
    full = peak_bytes(image_format="JPEG", mode="RGB", width=800, height=600)
    stored = ImageLimits(max_decode_bytes=full // 3, refuse_over_decode_bytes=False)
    assert decode_image(jpeg, limits=stored).image.size == (400, 300)  # as a search would decode it
    tiny_cap = ImageLimits(max_decode_bytes=full // 100, refuse_over_decode_bytes=False)
    assert decode_image(jpeg, limits=tiny_cap).image.size == (100, 75)  # 1/8, the most there is


@pytest.mark.parametrize("side", [16, 64, 100, 128, 256, 900])
def test_jpeg_draft_scale_is_the_scale_pillow_drafts_a_thumbnail_at(side: int):
    data = encode(Image.new("RGB", (800, 600)), "JPEG")
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))
        drafted = image.size
    scale = jpeg_draft_scale(width=800, height=600, side=side)
    assert drafted == (-(-800 // scale), -(-600 // scale))


def test_budget_is_first_come_first_served_and_never_over_capacity():
    budget = DecodeBudget(10)
    assert budget.acquire(6, timeout=0) == 6
    order: list[str] = []

    def take(name: str, nbytes: int) -> None:
        got = budget.acquire(nbytes, timeout=10)
        order.append(name)  # before the release: 8 + 3 never fit together, so no one overtakes it
        budget.release(got or 0)

    large = threading.Thread(target=take, args=("large", 8))
    large.start()
    wait_until(lambda: budget.waiting == 1)  # the large one waits first
    small = threading.Thread(target=take, args=("small", 3))
    small.start()
    wait_until(lambda: budget.waiting == 2)
    assert order == []  # the small one fits beside the 6, but waits its turn behind the large one
    budget.release(6)
    large.join(10)
    small.join(10)
    assert order == ["large", "small"]
    assert budget.reserved == 0 and budget.waiting == 0 and budget.peak <= budget.capacity


def test_budget_times_out_stops_and_clamps():
    budget = DecodeBudget(10)
    assert budget.acquire(25, timeout=0) == 10  # more than the whole budget: alone, not never
    assert budget.acquire(1, timeout=0.05) is None
    assert budget.acquire(1, timeout=None, stopped=lambda: True) is None
    with pytest.raises(DecodeMemoryFull) as refused, budget.reserve(1, wait_s=0.05):
        pass
    assert refused.value.code == "overloaded" and refused.value.headers == {"Retry-After": "1"}
    budget.release(10)
    with budget.reserve(4, wait_s=0):
        assert budget.reserved == 4
    assert budget.reserved == 0


def test_default_budget_and_the_per_image_cap_never_above_it(tmp_path):
    assert default_budget() >= 64 * 1024 * 1024
    settings = Settings(data_dir=tmp_path, decode_memory_budget_bytes=5_000_000)
    assert settings.decode_bytes_cap == 5_000_000
    settings = Settings(data_dir=tmp_path, decode_memory_budget_bytes=5_000_000, max_decode_bytes=1_000)
    assert settings.decode_bytes_cap == 1_000
