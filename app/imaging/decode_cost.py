"""What decoding an image costs in memory, read from its header before any pixel exists.

The pixel caps (CBIR_MAX_PIXELS, CBIR_MAX_SIDE) bound how many pixels an image has, not how many
bytes its decoding holds: a 16-bit RGBA PNG of 40 megapixels compresses to a few hundred KB and
decoded to 0.7 GB. The estimate here is the peak of the buffers alive at once in
``app.imaging.decode.decode_image`` and the embedder's preprocessing that follows:

- the decoded frame: pixels x the bytes per pixel Pillow stores for the mode the header declares
  (bit depth and colour type of a PNG, the component count of a JPEG, a GIF's palette, a WebP's
  alpha). Pillow keeps 8-bit multi-channel modes in 4 bytes per pixel (RGB is padded to RGBX)
  and reads 16-bit RGB(A) samples straight into 8-bit, so a 16-bit RGBA PNG decodes to 4 bytes
  per pixel, a 16-bit grey one to 2;
- the conversion to RGB or L (a canvas for compositing transparency, a palette expanded to RGBA);
- after the decoded frame is released: the flat image and one copy of it (an EXIF rotation, or
  the RGB copy a CNN's preprocessing makes);
- for WebP, libwebp's own canvas and the frame's bytes beside Pillow's image.

The per-mode figures are measured peaks (benchmarks/decode_memory.py prints the estimate beside
the measured resident set), rounded up: an estimate, not an accounting of every allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per pixel at the peak of decode + conversion + rotation or preprocessing, by the Pillow
# mode of the decoded frame; the comments give the buffers alive at that peak.
_PEAK_BYTES_PER_PIXEL = {
    "1": 5,  # the flat L image (1) and an RGB copy of it (4)
    "L": 5,  # likewise
    "I;16": 5,  # 16-bit grey (2), rescaled (2), then L (1); or L and an RGB copy
    "RGB": 8,  # the frame (4) and one copy (4)
    "CMYK": 8,  # the frame (4) and its RGB conversion (4)
    "RGBA": 8,  # the frame (4) and the RGB canvas it is composited on (4)
    "P": 9,  # the palette frame (1), expanded to RGBA (4), composited on a canvas (4)
    "LA": 13,  # the frame (4), as RGBA (4), composited (4), then L (1)
}
# libwebp's canvas and the frame's bytes, handed to Pillow, beside Pillow's image.
_WEBP_EXTRA_BYTES_PER_PIXEL = 8
# The preprocessing's resize passes and the allocator's slack: measured peaks were 0.4 to 0.6 bytes
# a pixel above the buffers counted above.
_SLACK_BYTES_PER_PIXEL = 1
# JPEG's DCT scaling: a frame decoded at 1/2, 1/4 or 1/8 of each side (``Image.draft``).
JPEG_SCALES = (1, 2, 4, 8)

# PNG (bit depth, colour type) -> the mode Pillow decodes to (PngImagePlugin._MODES).
_PNG_MODES = {
    (1, 0): "1",
    (2, 0): "L",
    (4, 0): "L",
    (8, 0): "L",
    (16, 0): "I;16",
    (8, 2): "RGB",
    (16, 2): "RGB",
    (1, 3): "P",
    (2, 3): "P",
    (4, 3): "P",
    (8, 3): "P",
    (8, 4): "LA",
    (16, 4): "RGBA",  # Pillow widens 16-bit grey + alpha to RGBA
    (8, 6): "RGBA",
    (16, 6): "RGBA",
}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


@dataclass(frozen=True)
class DecodeCost:
    """The header's facts and the estimated peak bytes of decoding it at ``scale``."""

    format: str
    mode: str
    width: int
    height: int
    nbytes: int
    scale: int = 1  # each side divided by this when decoded (JPEG only)

    def describe(self) -> str:
        size = f"{self.width}x{self.height}"
        reduced = f" at 1/{self.scale} scale" if self.scale > 1 else ""
        return f"a {size} {self.format} image decoded as {self.mode}{reduced} needs about {self.nbytes} bytes"


def peak_bytes(*, image_format: str, mode: str, width: int, height: int, scale: int = 1) -> int:
    """Estimated peak bytes of decoding a frame of this mode and size (unknown modes count as
    the most costly one)."""
    pixels = -(-width // scale) * -(-height // scale)
    per_pixel = _PEAK_BYTES_PER_PIXEL.get(mode, max(_PEAK_BYTES_PER_PIXEL.values())) + _SLACK_BYTES_PER_PIXEL
    if image_format == "WEBP":
        per_pixel += _WEBP_EXTRA_BYTES_PER_PIXEL
    return pixels * per_pixel


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """Width, height and component count in the first start-of-frame marker, walking the
    segments before it."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan: no frame header before it
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(data):
                return None
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            return width, height, data[at + 9] if at + 9 < len(data) else 0  # 0: cut off
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def _webp_mode(data: bytes) -> str | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        return "RGB"
    if chunk == b"VP8X" and len(data) > 20:
        return "RGBA" if data[20] & 0x10 else "RGB"
    if chunk == b"VP8L" and len(data) >= 25:
        return "RGBA" if (int.from_bytes(data[21:25], "little") >> 28) & 1 else "RGB"
    return None


def header_mode(data: bytes, *, image_format: str) -> str | None:
    """The mode Pillow will decode the first frame to, from the header; None when unknown."""
    if image_format == "PNG" and len(data) >= 26 and data[12:16] == b"IHDR":
        return _PNG_MODES.get((data[24], data[25]))
    if image_format == "JPEG":
        frame = jpeg_frame(data)
        return _JPEG_MODES.get(frame[2]) if frame else None
    if image_format == "GIF":
        return "P"
    if image_format == "WEBP":
        return _webp_mode(data)
    return None


def jpeg_draft_scale(*, width: int, height: int, side: int) -> int:
    """The scale Pillow's JPEG ``draft`` picks to reach at least ``side`` x ``side`` (what a
    thumbnail asks for): the largest of 8, 4, 2, 1 that leaves both sides at least ``side``."""
    most = min(width // side, height // side) if side > 0 else 1
    return next(scale for scale in reversed(JPEG_SCALES) if scale <= max(1, most))


def fit_scale(*, image_format: str, mode: str, width: int, height: int, max_bytes: int) -> int | None:
    """The smallest decode scale whose estimate fits ``max_bytes`` (1 for a full decode); None
    when none does. Only JPEG can be decoded at a reduced scale."""
    scales = JPEG_SCALES if image_format == "JPEG" else (1,)
    for scale in scales:
        if (
            peak_bytes(image_format=image_format, mode=mode, width=width, height=height, scale=scale)
            <= max_bytes
        ):
            return scale
    return None
