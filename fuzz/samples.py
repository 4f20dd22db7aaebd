"""Hostile and awkward image files for the decode path, built from scratch (struct, zlib, Pillow).

Shared by the reliability tests (tests/reliability/test_a_decode.py) and the fuzzing corpus seed
(fuzz/seed_corpus.py). Every function is deterministic: the same arguments give the same bytes
(with the same Pillow).
"""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(image: Image.Image, image_format: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **params)
    return out.getvalue()


def noise(mode: str, size: tuple[int, int], *, seed: int = 0) -> Image.Image:
    """A seeded random image of ``mode`` (L, RGB, RGBA, LA, CMYK)."""
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode=mode)


def gradient(size: tuple[int, int] = (32, 24)) -> np.ndarray:
    """(h, w) float64 in [0, 1]: a diagonal ramp, so that no awkward mode decodes to a flat image."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    return (xs / max(width - 1, 1) + ys / max(height - 1, 1)) / 2


# --- PNG ---------------------------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png(
    width: int, height: int, *, idat: bytes | None = None, bit_depth: int = 8, colour_type: int = 0
) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height``; the pixel data is one zero row unless
    ``idat`` is given (a header bomb: big on paper, a few dozen bytes on disk)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"\x00" * min(width + 1, 1 << 16))
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rgb16_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) from uint16 (h, w, 3)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return png(width, height, idat=zlib.compress(rows), bit_depth=16, colour_type=2)


# --- Header-only bombs of the other allowed formats ----------------------------------------------


def jpeg_header(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 declaring the size (3 components), EOI: no tables, no scan."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def webp_vp8x(width: int, height: int) -> bytes:
    """A RIFF/WEBP file with only the extended header chunk (canvas size), no image data."""
    payload = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def gif(
    *,
    screen: tuple[int, int] = (1, 1),
    frame: tuple[int, int] = (1, 1),
    offset: tuple[int, int] = (0, 0),
    disposal: int | None = None,
) -> bytes:
    """A one-frame GIF with a two-colour global palette, written by hand: the logical screen and
    the frame's size and offset are free (a screen or frame bomb)."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    control = b""
    if disposal is not None:
        control = b"\x21\xf9\x04" + bytes([disposal << 2]) + b"\x00\x00\x00\x00"
    descriptor = b"\x2c" + struct.pack("<HHHHB", *offset, *frame, 0)
    # LZW, minimum code size 2: clear, one pixel of colour 0, end of information.
    pixels = b"\x02\x02\x44\x01\x00"
    return header + control + descriptor + pixels + b"\x3b"


# --- Truncation, junk ---------------------------------------------------------------------------


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def junk() -> dict[str, bytes]:
    """Bytes that are no image at all (the empty upload is separate: it is a 400)."""
    return {
        "text": b"hello",
        "html": b"<html>",
        "random": random.Random(1234).randbytes(4096),
    }


# --- Formats outside the allow-list --------------------------------------------------------------


def _psd(width: int = 4, height: int = 4) -> bytes:
    """A minimal raw RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: empty
    return header + sections + struct.pack(">H", 0) + bytes(3 * width * height)


def _fits(width: int = 4, height: int = 4) -> bytes:
    """A minimal 8-bit FITS image (Pillow reads FITS but cannot write it)."""
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        f"NAXIS1  = {width:>20}",
        f"NAXIS2  = {height:>20}",
        "END",
    ]
    header = "".join(card.ljust(80) for card in cards).ljust(2880).encode("ascii")
    return header + bytes(width * height).ljust(2880, b"\x00")


def foreign() -> dict[str, bytes]:
    """One small sample of each format outside the allow-list, as Pillow (or a person) writes it."""
    rgb = noise("RGB", (8, 8), seed=7)
    return {
        "tiff": encode(rgb, "TIFF"),
        "bmp": encode(rgb, "BMP"),
        "ico": encode(rgb, "ICO", sizes=[(8, 8)]),
        "tga": encode(rgb, "TGA"),
        "psd": _psd(),
        "pdf": encode(rgb, "PDF"),
        "eps": encode(rgb, "EPS"),
        "fits": _fits(),
        "spider": encode(Image.new("F", (8, 8), 0.5), "SPIDER"),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8"/></svg>',
    }


# --- Awkward modes -------------------------------------------------------------------------------


def awkward_modes(size: tuple[int, int] = (32, 24)) -> dict[str, bytes]:
    """Each mode the decoder has to flatten to RGB or L, with content (never a flat image)."""
    ramp = gradient(size)
    grey = Image.fromarray((ramp * 255).astype(np.uint8), mode="L")
    rgb = Image.merge("RGB", (grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey))
    alpha = Image.fromarray(np.where(ramp > 0.5, 255, 0).astype(np.uint8), mode="L")

    palette = Image.fromarray((ramp * 3).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = grey.copy()
    la.putalpha(alpha)
    cmyk = Image.merge(
        "CMYK", (grey, grey.transpose(Image.Transpose.FLIP_TOP_BOTTOM), grey, grey.point(lambda v: v // 4))
    )
    i16 = Image.fromarray((ramp * 65535).astype(np.uint16))
    bits = Image.fromarray(ramp > 0.5).convert("1")
    rgb16 = np.stack([ramp * 65535, ramp[:, ::-1] * 65535, np.full_like(ramp, 30000)], axis=-1)
    return {
        "P_tRNS": encode(palette, "PNG", transparency=0),
        "LA": encode(la, "PNG"),
        "RGBA": encode(rgba, "PNG"),
        "CMYK_jpeg": encode(cmyk, "JPEG", quality=90),
        "I16": encode(i16, "PNG"),
        "1": encode(bits, "PNG"),
        "L": encode(grey, "PNG"),
        "RGB16": rgb16_png(rgb16.astype(np.uint16)),
    }


# --- Multi-frame ---------------------------------------------------------------------------------


def _frames(count: int, size: tuple[int, int]) -> list[Image.Image]:
    return [noise("RGB", size, seed=seed) for seed in range(count)]


def animated_gif(count: int, size: tuple[int, int] = (16, 16)) -> bytes:
    frames = [frame.convert("P", palette=Image.Palette.ADAPTIVE, colors=16) for frame in _frames(count, size)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20, loop=0)


def animated_webp(count: int, size: tuple[int, int] = (16, 16)) -> bytes:
    frames = _frames(count, size)
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=20)


def apng(count: int, size: tuple[int, int] = (16, 16)) -> bytes:
    frames = _frames(count, size)
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=20)


def mpo(count: int = 2, size: tuple[int, int] = (16, 16)) -> bytes:
    """A multi-picture JPEG (what stereo cameras write): Pillow opens it as MPO."""
    frames = _frames(count, size)
    return encode(frames[0], "MPO", save_all=True, append_images=frames[1:])


# --- The corpus seed -----------------------------------------------------------------------------


def seeds() -> dict[str, bytes]:
    """Small files of the shapes of plan items 1-12 (decode path), named by item and shape."""
    pattern = noise("RGB", (48, 48), seed=3)
    valid = {"png": encode(pattern, "PNG"), "jpeg": encode(pattern, "JPEG", quality=80)}
    valid["gif"] = encode(pattern.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    valid["webp"] = encode(pattern, "WEBP", quality=80)
    out: dict[str, bytes] = {f"00-valid-{name}": data for name, data in valid.items()}
    out["01-png-header-bomb"] = png(60000, 60000)
    out["02-png-above-cap"] = png(2001, 2000)
    out["02-png-above-pillow-limit"] = png(10000, 9000)
    out["02-jpeg-above-pillow-limit"] = jpeg_header(10000, 9000)
    out["02-webp-above-pillow-limit"] = webp_vp8x(10000, 9000)
    out["03-gif-screen-bomb"] = gif(screen=(65535, 65535))
    out["03-gif-frame-bomb"] = gif(frame=(65535, 65535), disposal=2)
    out["03-gif-offset-bomb"] = gif(offset=(60000, 60000))
    out["04-png-long-thin"] = encode(Image.new("L", (1, 100000)), "PNG")
    for name in ("png", "jpeg", "gif", "webp"):
        for fraction in (0.1, 0.5, 0.99):
            out[f"05-truncated-{name}-{int(fraction * 100)}"] = truncated(valid[name], fraction)
    out.update({f"06-{name}": data for name, data in junk().items()})
    out.update({f"07-{name}": data for name, data in foreign().items()})
    out.update({f"09-{name}": data for name, data in awkward_modes().items()})
    out["11-gif-20-frames"] = animated_gif(20)
    out["11-webp-3-frames"] = animated_webp(3)
    out["11-apng-3-frames"] = apng(3)
    out["11-mpo-2-pictures"] = mpo(2)
    out.update({f"12-{name}": data for name, data in malformed(valid).items()})
    return out


def malformed(valid: dict[str, bytes]) -> dict[str, bytes]:
    """Files that reach Pillow's parsers and decoders with inconsistent fields (Pillow's openers
    and decoders have raised ValueError, struct.error, IndexError, ... on such files)."""

    def flipped(data: bytes, start: float) -> bytes:
        at = int(len(data) * start)
        return data[:at] + bytes(b ^ 0x5A for b in data[at : at + 64]) + data[at + 64 :]

    lzw_code_size_12 = gif().replace(b"\x02\x02\x44\x01\x00", b"\x0c\x02\x44\x01\x00")
    return {
        "png-bit-depth-3": png(4, 4, bit_depth=3, colour_type=2),
        "png-zero-size": png(0, 0),
        "png-bad-idat": png(4, 4, idat=b"not zlib at all"),
        "png-corrupt-middle": flipped(valid["png"], 0.5),
        "jpeg-corrupt-middle": flipped(valid["jpeg"], 0.5),
        "jpeg-zero-size": jpeg_header(0, 0),
        "gif-lzw-code-size-12": lzw_code_size_12,
        "gif-zero-frame": gif(frame=(0, 0)),
        "webp-corrupt-middle": flipped(valid["webp"], 0.5),
        "webp-vp8x-only": webp_vp8x(16, 16),
    }
