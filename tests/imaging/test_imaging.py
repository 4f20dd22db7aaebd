"""decode_image: any accepted file becomes one RGB or L frame of the right size; the rest is refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from app.core.errors import (
    CbirError,
    EmptyUpload,
    ImageRejected,
    ImageTooLarge,
    ImageTruncated,
    UnsupportedImage,
)
from app.imaging.decode import ImageLimits, decode_image
from tests.conftest import encode

LIMITS = ImageLimits(max_pixels=4_000_000, max_side=4096)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def rgb16_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) from uint16 (h, w, 3)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def decoded_pixels(data: bytes) -> tuple[str, tuple[int, int], np.ndarray]:
    decoded = decode_image(data, limits=LIMITS)
    assert decoded.image.mode in ("RGB", "L")
    assert decoded.image.size == (decoded.width, decoded.height)
    return decoded.image.mode, decoded.image.size, np.asarray(decoded.image)


def test_rgb_png_is_returned_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"), limits=LIMITS)
    assert decoded.format == "PNG" and (decoded.width, decoded.height) == (30, 20)
    np.testing.assert_array_equal(np.asarray(decoded.image), pixels)


def test_greyscale_png_stays_greyscale():
    mode, size, _ = decoded_pixels(encode(Image.new("L", (7, 5), 100), "PNG"))
    assert (mode, size) == ("L", (7, 5))


def test_palette_png_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 3), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((0, 0), 1)
    mode, size, pixels = decoded_pixels(encode(image, "PNG", transparency=0))
    assert (mode, size) == ("RGB", (4, 3))
    assert pixels[0, 0].tolist() == [10, 20, 30]
    assert pixels[1, 1].tolist() == [255, 255, 255]  # palette entry 0 is transparent


def test_greyscale_with_alpha_becomes_greyscale_on_white():
    image = Image.new("LA", (5, 5), (0, 0))
    image.putpixel((2, 2), (40, 255))
    mode, size, pixels = decoded_pixels(encode(image, "PNG"))
    assert (mode, size) == ("L", (5, 5))
    assert pixels[2, 2] == 40 and pixels[0, 0] == 255


def test_rgba_is_alpha_composited_on_white():
    image = Image.new("RGBA", (6, 4), (200, 0, 0, 128))
    image.putpixel((0, 0), (0, 0, 0, 0))
    mode, size, pixels = decoded_pixels(encode(image, "PNG"))
    assert (mode, size) == ("RGB", (6, 4))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[1, 1].tolist() == pytest.approx([227, 127, 127], abs=2)


def test_cmyk_jpeg_becomes_rgb():
    mode, size, pixels = decoded_pixels(encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"))
    assert (mode, size) == ("RGB", (8, 6))
    assert pixels[3, 3].tolist() == pytest.approx([255, 0, 0], abs=8)


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    mode, size, pixels = decoded_pixels(encode(image, "PNG"))
    assert (mode, size) == ("L", (4, 1))
    assert pixels[0].tolist() == pytest.approx([0, 1, 128, 255], abs=1)


def test_16_bit_rgb_png_becomes_8_bit_rgb():
    pixels16 = np.zeros((3, 5, 3), dtype=np.uint16)
    pixels16[..., 0] = 65535
    pixels16[..., 2] = 32768
    mode, size, pixels = decoded_pixels(rgb16_png(pixels16))
    assert (mode, size) == ("RGB", (5, 3))
    assert pixels[1, 1].tolist() == pytest.approx([255, 0, 128], abs=1)


def test_one_bit_png_becomes_greyscale():
    image = Image.new("1", (9, 9), 0)
    image.putpixel((4, 4), 1)
    mode, size, pixels = decoded_pixels(encode(image, "PNG"))
    assert (mode, size) == ("L", (9, 9))
    assert pixels[4, 4] == 255 and pixels[0, 0] == 0


@pytest.mark.parametrize(
    ("orientation", "size"), [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))]
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]):
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 10, 10))  # a dark top-left corner in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), limits=LIMITS)
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == size
    assert (decoded.width, decoded.height) == size  # what a browser shows
    dark = {1: (0, 0), 3: (39, 19), 6: (19, 0), 8: (0, 39)}[orientation]
    assert max(decoded.image.getpixel(dark)) < 60


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("P", (10, 10), i) for i in range(3)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    decoded = decode_image(data, limits=LIMITS)
    assert decoded.format == "GIF" and decoded.image.size == (10, 10)
    assert decoded.image.convert("RGB").getpixel((5, 5)) == (255, 0, 0)


def test_animated_webp_gives_its_first_frame():
    red, blue = Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (10, 10), (0, 0, 255))
    data = encode(red, "WEBP", save_all=True, append_images=[blue], lossless=True)
    decoded = decode_image(data, limits=LIMITS)
    assert decoded.format == "WEBP"
    assert decoded.image.convert("RGB").getpixel((5, 5)) == (255, 0, 0)


def test_limits_are_inclusive():
    decoded = decode_image(
        encode(Image.new("L", (16, 4)), "PNG"), limits=ImageLimits(max_pixels=64, max_side=16)
    )
    assert (decoded.width, decoded.height) == (16, 4)
    with pytest.raises(ImageTooLarge):
        decode_image(encode(Image.new("L", (17, 1)), "PNG"), limits=ImageLimits(max_pixels=64, max_side=16))
    with pytest.raises(ImageTooLarge):
        decode_image(encode(Image.new("L", (13, 5)), "PNG"), limits=ImageLimits(max_pixels=64, max_side=16))


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (b"", EmptyUpload, "empty_upload"),
        (b"hello", ImageRejected, "not_an_image"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), UnsupportedImage, "unsupported_format"),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), UnsupportedImage, "unsupported_format"),
        (b"  <svg xmlns='http://www.w3.org/2000/svg'></svg>", UnsupportedImage, "unsupported_format"),
    ],
    ids=["empty", "text", "bmp", "tiff", "svg"],
)
def test_refused_inputs_raise_their_domain_error(data: bytes, error: type[CbirError], code: str):
    with pytest.raises(error) as info:
        decode_image(data, limits=LIMITS)
    assert info.value.code == code


def test_truncated_png_is_reported_as_truncated_and_the_global_flag_is_untouched():
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "PNG")
    with pytest.raises(ImageTruncated):
        decode_image(data[: len(data) // 2], limits=LIMITS)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        struct.error("bad"),
        IndexError("bad"),
        ZeroDivisionError("bad"),
        OverflowError("bad"),
        NotImplementedError("bad"),
        MemoryError(),
        EOFError(),
        SyntaxError("bad"),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("stage", ["open", "load"])
def test_decoder_exceptions_become_a_rejection(monkeypatch: pytest.MonkeyPatch, exc: Exception, stage: str):
    # Pillow's plugins have raised all of these on crafted files; none may escape as a 500.
    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    if stage == "open":
        monkeypatch.setattr(Image, "open", boom)
    else:
        monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(ImageRejected) as info:
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), limits=LIMITS)
    assert info.value.status in (413, 422)
