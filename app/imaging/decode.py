"""Decode and validate untrusted image bytes: allow-listed formats, size caps before pixels.

The order matters: the size the header declares is checked by our own parser before Pillow sees
the bytes (Pillow's GIF and WebP openers allocate a canvas or a disposal buffer while opening),
again on what Pillow opened, and only then is the first frame decoded. Our pixel cap is never
above Pillow's ``MAX_IMAGE_PIXELS``, so every image Pillow would warn about
(``DecompressionBombWarning``) is refused with a 413 by us, whatever the process's warning filters
say: warning filters are process-global, and changing them per call would race other threads.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import ExifTags, GifImagePlugin, Image, ImageColor, SpiderImagePlugin, UnidentifiedImageError

from app.core.errors import (
    EmptyUpload,
    ImageRejected,
    ImageTooLarge,
    ImageTruncated,
    TooManyFrames,
    UnsupportedImage,
)
from app.imaging.decode_cost import JPEG_SCALES, DecodeCost, fit_scale, header_mode, jpeg_frame, peak_bytes
from app.imaging.decode_cost import jpeg_draft_scale as draft_scale

if TYPE_CHECKING:
    from app.core.settings import Settings

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
# Signatures of formats Pillow (or a browser) knows but we refuse: a clear 415, not "not an image".
_FOREIGN_SIGNATURES = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "BigTIFF",
    b"MM\x00+": "BigTIFF",
    b"BM": "BMP",
    b"\x00\x00\x01\x00": "ICO",
    b"icns": "ICNS",
    b"8BPS": "PSD",
    b"%PDF": "PDF",
    b"%!PS": "EPS",
    b"\xc5\xd0\xd3\xc6": "EPS",
    b"SIMPLE  =": "FITS",
    b"qoif": "QOI",
    b"DDS ": "DDS",
    b"\x00\x00\x00\x0cjP": "JPEG2000",
    b"\xff\x4f\xff\x51": "JPEG2000",
    b"\xff\x0a": "JPEG XL",
    b"\x00\x00\x00\x0cJXL ": "JPEG XL",
    b"gimp xcf": "XCF",
    b"/* XPM */": "XPM",
    b"\x01\xda": "SGI",
    b"\x59\xa6\x6a\x95": "Sun raster",
}
# ISO base media files (HEIC, AVIF): "ftyp" at offset 4, the brand after it.
_FTYP_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
# Truevision TGA has no signature: these header fields are what Pillow's TGA opener insists on.
_TGA_IMAGE_TYPES = {1, 2, 3, 9, 10, 11, 32, 33}
_TGA_DEPTHS = {1, 8, 15, 16, 24, 32}

# What Pillow's decoders raise on hostile input besides OSError (Pillow#9814 lists several).
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    EOFError,
    SyntaxError,
    zlib.error,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
    MemoryError,
    RecursionError,
)
_OPEN_ERRORS: tuple[type[BaseException], ...] = (OSError, *_DECODER_ERRORS)
_TRUNCATION_HINTS = ("truncated", "unexpected end", "premature end", "not enough data")


@dataclass(frozen=True)
class ImageLimits:
    """What decode_image accepts, and how it flattens transparency."""

    max_pixels: int = 40_000_000
    max_side: int = 16_384
    # Frames a file may declare (APNG, WebP, MPO state their count in the header; GIF does not,
    # and is never walked). Only the first frame is decoded either way.
    max_frames: int = 1000
    # RGB colour transparent pixels are composited on before embedding.
    background: tuple[int, int, int] = (255, 255, 255)
    # Estimated peak bytes of decoding one image (app/imaging/decode_cost.py); None: no cap.
    max_decode_bytes: int | None = None
    # False for a file already stored: the cap then only chooses a JPEG's reduced scale (1/8 where
    # none fits); anything else is decoded whole (app.imaging.decoding.decoding_stored holds the
    # budget for it).
    refuse_over_decode_bytes: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_pixels=settings.max_pixels,
            max_side=settings.max_side,
            max_frames=settings.max_frames,
            background=parse_background(settings.alpha_background),
            max_decode_bytes=settings.decode_bytes_cap,
        )


def parse_background(value: str) -> tuple[int, int, int]:
    """A CSS colour ("#ffffff", "white", "rgb(0,0,0)") as RGB; ValueError when it is not one."""
    red, green, blue = ImageColor.getrgb(value)[:3]
    return red, green, blue


@dataclass(frozen=True)
class DecodedImage:
    """A decoded first frame, EXIF-rotated, in mode RGB or L. ``width`` and ``height`` are the
    image's own (upright) size, also when a JPEG over CBIR_MAX_DECODE_BYTES was decoded at a
    reduced scale."""

    image: Image.Image
    format: str
    width: int
    height: int


def pixel_cap(limits: ImageLimits) -> int:
    """Our pixel limit, never above Pillow's warning threshold (see the module docstring)."""
    pillow = Image.MAX_IMAGE_PIXELS
    return limits.max_pixels if pillow is None else min(limits.max_pixels, pillow)


def _check_size(width: int, height: int, *, limits: ImageLimits, what: str = "the image") -> None:
    if width > limits.max_side or height > limits.max_side:
        raise ImageTooLarge(f"{what} is {width}x{height}; each side must be at most {limits.max_side} pixels")
    cap = pixel_cap(limits)
    if width * height > cap:
        raise ImageTooLarge(f"{what} has {width * height} pixels ({width}x{height}); the limit is {cap}")


# --- Header parsers: the declared size, read without Pillow and without allocating pixels. -------


def _u16le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _gif_sizes(data: bytes) -> list[tuple[int, int]]:
    """The logical screen, and the extent (offset + size) of the first frame when it is present."""
    if len(data) < 13:
        return []
    sizes = [(_u16le(data, 6), _u16le(data, 8))]
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    # Skip extension blocks (a chain of length-prefixed sub-blocks each) up to the first frame.
    while at < len(data):
        block = data[at]
        if block == 0x2C:  # image descriptor
            if at + 9 <= len(data):
                x, y = _u16le(data, at + 1), _u16le(data, at + 3)
                sizes.append((x + _u16le(data, at + 5), y + _u16le(data, at + 7)))
            break
        if block != 0x21:  # the trailer, or garbage: Pillow decides
            break
        at += 2
        while at < len(data) and data[at]:
            at += data[at] + 1
        at += 1
    return sizes


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = jpeg_frame(data)
    return frame[:2] if frame else None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return _u16le(data, 26) & 0x3FFF, _u16le(data, 28) & 0x3FFF
    if chunk == b"VP8X" and len(data) >= 30:
        return (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _allowed_kind(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def declared_sizes(data: bytes) -> list[tuple[int, int]]:
    """Every canvas size the header of an allowed format declares (empty when unknown)."""
    kind = _allowed_kind(data)
    if kind == "GIF":
        return _gif_sizes(data)
    parser = {"PNG": _png_size, "JPEG": _jpeg_size, "WEBP": _webp_size}.get(kind or "")
    size = parser(data) if parser else None
    return [size] if size else []


def _png_truncated(data: bytes) -> bool:
    at = 8
    while at + 12 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        if data[at + 4 : at + 8] == b"IEND":
            return False
        at += 12 + length
    return True


_SIGNATURE_LENGTHS = {"PNG": 8, "GIF": 6, "JPEG": 3, "WEBP": 12}


def _looks_truncated(data: bytes) -> bool:
    """Whether a file of an allowed format ends before its own structure says it does (a bare
    signature is no image yet: "not an image", not "truncated")."""
    kind = _allowed_kind(data)
    if kind is None or len(data) <= _SIGNATURE_LENGTHS[kind]:
        return False
    if kind == "PNG":
        return _png_truncated(data)
    if kind == "JPEG":
        return not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if kind == "GIF":
        return not data.rstrip(b"\x00\r\n ").endswith(b";")
    if kind == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


# --- Formats we refuse --------------------------------------------------------------------------


def _is_tga(data: bytes) -> bool:
    if len(data) < 18:
        return False
    colormap, kind, depth = data[1], data[2], data[16]
    width, height = _u16le(data, 12), _u16le(data, 14)
    return colormap in (0, 1) and kind in _TGA_IMAGE_TYPES and depth in _TGA_DEPTHS and width * height > 0


def _is_spider(data: bytes) -> bool:
    if len(data) < 92:
        return False
    for order in (">", "<"):
        header = struct.unpack(f"{order}23f", data[:92])
        try:
            if SpiderImagePlugin.isSpiderHeader(header):
                return True
        except (ValueError, OverflowError):
            pass  # NaN or infinite header values: not SPIDER
    return False


def sniff_foreign(data: bytes) -> str | None:
    """The name of a known image format we do not accept, from the first bytes; None if unknown."""
    for signature, name in _FOREIGN_SIGNATURES.items():
        if data.startswith(signature):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return _FTYP_BRANDS[data[8:12]]
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in head):
        return "SVG"
    if _is_spider(data):
        return "SPIDER"
    if _is_tga(data):
        return "TGA"
    return None


# --- Decoding -----------------------------------------------------------------------------------


def _to_rgb_or_l(image: Image.Image, *, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in ("RGB", "L"):
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # No copy of an RGBA frame, and its own alpha band as the mask: the frame and the canvas
        # are the only full-size buffers (app/imaging/decode_cost.py counts them).
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba)
        return canvas.convert("L") if image.mode in ("LA", "La") else canvas
    if image.mode in ("1", "I", "F") or image.mode.startswith("I;"):
        if image.mode.startswith("I"):
            # 16/32-bit grey: scale to 8 bits instead of clipping at 255.
            image = image.point(lambda value: value * (255.0 / 65535.0)) if image.mode != "I" else image
        return image.convert("L")
    return image.convert("RGB")


def _frame_count(image: Image.Image) -> int | None:
    """The frame count where the header states it; None for GIF, which has to be walked to count."""
    if isinstance(image, GifImagePlugin.GifImageFile):
        return None
    frames = getattr(image, "n_frames", 1)
    return frames if isinstance(frames, int) else None


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        foreign = sniff_foreign(data)
        if foreign:
            raise UnsupportedImage(
                f"{foreign} images are not accepted; send one of {', '.join(ALLOWED_FORMATS)}"
            ) from None
        if _allowed_kind(data) and _looks_truncated(data):
            raise ImageTruncated("the image data ends early (truncated file)") from None
        raise ImageRejected(
            f"the file is not a recognisable image; send one of {', '.join(ALLOWED_FORMATS)}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only where our header parser and Pillow's disagree; the warning is an exception only
        # where warnings are errors (tests, -W error).
        raise ImageTooLarge(str(exc)) from None
    except Warning as exc:  # e.g. "malformed MPO file", raised where warnings are errors
        raise ImageRejected(f"the image header could not be read: {exc}") from None
    except _OPEN_ERRORS as exc:
        if _is_truncation(exc, data):
            raise ImageTruncated("the image data ends early (truncated file)") from None
        raise ImageRejected(f"the image header could not be read: {type(exc).__name__}: {exc}") from None


def _is_truncation(exc: BaseException, data: bytes) -> bool:
    message = str(exc).lower()
    return any(hint in message for hint in _TRUNCATION_HINTS) or _looks_truncated(data)


def plan_decode(data: bytes, *, limits: ImageLimits) -> DecodeCost | None:
    """The size caps, then the estimated decode bytes, from the header alone (no pixel, no Pillow).

    Returns the cost at the scale the image will be decoded at: a JPEG whose full decode is over
    ``limits.max_decode_bytes`` is decoded at 1/2, 1/4 or 1/8 of each side where that fits; any
    other image over it raises ImageTooLarge (413). None when the header does not say (the
    decoder's answer is then checked against the cap once Pillow has read the header).
    """
    if not data:
        raise EmptyUpload("the uploaded file is empty")
    sizes = declared_sizes(data)
    for width, height in sizes:
        _check_size(width, height, limits=limits, what="the image (as its header declares it)")
    image_format = _allowed_kind(data)
    mode = header_mode(data, image_format=image_format) if image_format else None
    if image_format is None or mode is None or not sizes:
        return None
    # A GIF frame may reach past its logical screen: count the larger extent.
    width, height = max(w for w, _ in sizes), max(h for _, h in sizes)
    return _fit(image_format=image_format, mode=mode, width=width, height=height, limits=limits)


def _fit(*, image_format: str, mode: str, width: int, height: int, limits: ImageLimits) -> DecodeCost:
    full = DecodeCost(
        image_format,
        mode,
        width,
        height,
        peak_bytes(image_format=image_format, mode=mode, width=width, height=height),
    )
    cap = limits.max_decode_bytes
    if cap is None or full.nbytes <= cap:
        return full
    scale = fit_scale(image_format=image_format, mode=mode, width=width, height=height, max_bytes=cap)
    if scale is None and not limits.refuse_over_decode_bytes:  # stored: the cheapest decode there is
        scale = JPEG_SCALES[-1] if image_format == "JPEG" else 1
    if scale is None:
        raise ImageTooLarge(
            f"{full.describe()} to decode; the limit is {cap} bytes (CBIR_MAX_DECODE_BYTES, at most "
            "the decode memory budget): send it with fewer pixels"
        )
    nbytes = peak_bytes(image_format=image_format, mode=mode, width=width, height=height, scale=scale)
    return DecodeCost(image_format, mode, width, height, nbytes, scale)


# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_image(
    data: bytes, *, limits: ImageLimits, plan: DecodeCost | None = None, min_side: int | None = None
) -> DecodedImage:
    """Decode untrusted bytes to the first frame as RGB or L.

    Raises EmptyUpload (400), UnsupportedImage (415), ImageTooLarge (413), TooManyFrames,
    ImageTruncated or ImageRejected (422): nothing else for any input. Size caps are checked from
    the header, before any pixel is allocated; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone.
    ``plan`` is what ``plan_decode`` returned for these bytes (computed here when not given).
    ``min_side``: the shorter side the caller needs; a JPEG decodes at the largest DCT scale that keeps it.
    """
    if plan is None:
        plan = plan_decode(data, limits=limits)
    flat, image_format, orientation, size = _decode_flat(data, limits=limits, plan=plan, min_side=min_side)
    # Rotated after the conversion, once the decoded frame is released: a mode conversion and a
    # transposition commute, and the flat image is the smaller of the two.
    method = _UPRIGHT.get(orientation)
    if method is not None:
        flat = flat.transpose(method)
        if orientation >= 5:  # 5 to 8 turn the image a quarter
            size = (size[1], size[0])
    # The size a viewer shows: EXIF rotation may have swapped the sides.
    return DecodedImage(image=flat, format=image_format, width=size[0], height=size[1])


def _decode_flat(
    data: bytes, *, limits: ImageLimits, plan: DecodeCost | None, min_side: int | None = None
) -> tuple[Image.Image, str, int, tuple[int, int]]:
    """The first frame as RGB or L (not rotated), its format, EXIF orientation and full size.

    The Pillow image is released when this returns (with WebP's decoder and its canvas)."""
    image = _open(data)
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected(f"the image has an empty size {width}x{height}")
        _check_size(width, height, limits=limits)
        frames = _frame_count(image)
        if frames is not None and frames > limits.max_frames:
            raise TooManyFrames(
                f"the image declares {frames} frames; the limit is {limits.max_frames} (CBIR_MAX_FRAMES)"
            )
        # An MPO is a JPEG with more pictures after the first: stored and served as the JPEG it is.
        image_format = "JPEG" if image.format == "MPO" else (image.format or "?")
        # What Pillow read from the header decides where our parser could not (or disagrees).
        scale = _fit(
            image_format=image_format, mode=image.mode, width=width, height=height, limits=limits
        ).scale
        if plan is not None:
            scale = max(scale, plan.scale)
        wanted = scale  # the memory cap's, or the smallest decode the caller can use
        if min_side and image_format == "JPEG":
            wanted = max(scale, draft_scale(width=width, height=height, side=min_side))
        try:
            if wanted > 1:
                image.draft(image.mode, (max(1, width // wanted), max(1, height // wanted)))
                # The decoder cannot reduce this file: refused, or (stored) decoded whole.
                if scale > 1 and image.size == (width, height) and limits.refuse_over_decode_bytes:
                    raise ImageTooLarge(
                        f"the image needs more than {limits.max_decode_bytes} bytes to decode "
                        "(CBIR_MAX_DECODE_BYTES) and cannot be decoded at a reduced scale"
                    )
            image.load()  # the first frame only: animated files are never walked
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            flat = _to_rgb_or_l(image, background=limits.background)
            if flat is image:
                # The pixels without the file, so that closing it below (which also lets WebP's
                # decoder and its canvas go) keeps them: a new handle on the same pixels, no copy.
                flat = image._new(image.im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(str(exc)) from None
        except Warning as exc:
            raise ImageRejected(f"the image could not be decoded: {exc}") from None
        except OSError as exc:
            if _is_truncation(exc, data):
                raise ImageTruncated("the image data ends early (truncated file)") from None
            raise ImageRejected(f"the image could not be decoded: {exc}") from None
        except _DECODER_ERRORS as exc:
            if isinstance(exc, EOFError) and _looks_truncated(data):
                raise ImageTruncated("the image data ends early (truncated file)") from None
            raise ImageRejected(f"the image could not be decoded: {type(exc).__name__}") from None
    finally:
        image.close()
    return flat, image_format, orientation if isinstance(orientation, int) else 1, (width, height)
