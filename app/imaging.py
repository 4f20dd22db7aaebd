"""Decode and validate untrusted image bytes: allow-listed formats, size caps before pixels."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import EmptyUpload, ImageRejected, ImageTooLarge, ImageTruncated, UnsupportedImage

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
# Signatures of formats Pillow (or a browser) knows but we refuse: a clear 415, not "not an image".
_FOREIGN_SIGNATURES = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
    b"\x00\x00\x01\x00": "ICO",
    b"8BPS": "PSD",
    b"%PDF": "PDF",
    b"%!PS": "EPS",
    b"\xc5\xd0\xd3\xc6": "EPS",
    b"SIMPLE  =": "FITS",
    b"qoif": "QOI",
    b"\x00\x00\x00\x0cjP": "JPEG2000",
}


# What Pillow's decoders raise on hostile input besides OSError (Pillow#9814 lists several).
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    struct.error,
    IndexError,
    EOFError,
    SyntaxError,
    zlib.error,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
    MemoryError,
)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000
    max_side: int = 16_384


@dataclass(frozen=True)
class DecodedImage:
    """A decoded first frame, EXIF-rotated, in mode RGB or L."""

    image: Image.Image
    format: str
    width: int
    height: int


def _sniff_foreign(data: bytes) -> str | None:
    for signature, name in _FOREIGN_SIGNATURES.items():
        if data.startswith(signature):
            return name
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def _to_rgb_or_l(image: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    if image.mode in ("RGB", "L"):
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas.convert("L") if image.mode in ("LA", "La") else canvas
    if image.mode in ("1", "I", "F") or image.mode.startswith("I;"):
        if image.mode.startswith("I"):
            # 16/32-bit grey: scale to 8 bits instead of clipping at 255.
            image = image.point(lambda value: value * (255.0 / 65535.0)) if image.mode != "I" else image
        return image.convert("L")
    return image.convert("RGB")


def decode_image(data: bytes, *, limits: ImageLimits) -> DecodedImage:
    """Decode untrusted bytes to the first frame as RGB or L.

    Raises EmptyUpload, UnsupportedImage (415), ImageTooLarge (413), ImageTruncated or
    ImageRejected (422). Size caps are checked from the header, before any pixel is allocated.
    """
    if not data:
        raise EmptyUpload("the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        foreign = _sniff_foreign(data)
        if foreign:
            raise UnsupportedImage(
                f"{foreign} images are not accepted; send one of {', '.join(ALLOWED_FORMATS)}"
            ) from None
        raise ImageRejected(
            f"the file is not a recognisable image; send one of {', '.join(ALLOWED_FORMATS)}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning is an exception where warnings are errors (tests, -W error): still a 413.
        raise ImageTooLarge(str(exc)) from None
    except (OSError, *_DECODER_ERRORS) as exc:
        raise ImageRejected(f"the image header could not be read: {exc}") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(f"the image has an empty size {width}x{height}")
    if width > limits.max_side or height > limits.max_side:
        raise ImageTooLarge(
            f"the image is {width}x{height}; each side must be at most {limits.max_side} pixels"
        )
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image has {width * height} pixels ({width}x{height}); the limit is {limits.max_pixels}"
        )
    image_format = image.format or "?"
    try:
        image.load()  # first frame only; animated files are not walked
        image = ImageOps.exif_transpose(image) or image
        image = _to_rgb_or_l(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except OSError as exc:
        if "truncated" in str(exc).lower() or "unexpected end" in str(exc).lower():
            raise ImageTruncated("the image data ends early (truncated file)") from None
        raise ImageRejected(f"the image could not be decoded: {exc}") from None
    except _DECODER_ERRORS as exc:
        raise ImageRejected(f"the image could not be decoded: {type(exc).__name__}") from None
    # EXIF rotation may have swapped the sides: report the size a viewer shows.
    return DecodedImage(image=image, format=image_format, width=image.width, height=image.height)
