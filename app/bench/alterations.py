"""The alterations ``cbir bench duplicates`` makes of a photo: what a copy of it often went through.

Each is a function ``(image, strength) -> image`` on an RGB ``PIL.Image``; ``strength`` is one of
``STRENGTHS`` and scales the alteration (``standard`` is the issue's list: half size, JPEG quality
30, centre crop of 80 % of each side, horizontal flip, brightness +25 %, rotation by 5 degrees
with the corners filled black, a text watermark across the lower part). ``weak`` and ``strong``
exist to check that a threshold does not sit on the edge of the standard set. Deterministic: the
same image and strength give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFont

STRENGTHS = ("weak", "standard", "strong")
Alteration = Callable[[Image.Image, str], Image.Image]

_SCALE = {"weak": 0.7, "standard": 0.5, "strong": 0.25}
_QUALITY = {"weak": 50, "standard": 30, "strong": 15}
_CROP = {"weak": 0.9, "standard": 0.8, "strong": 0.65}
_BRIGHTNESS = {"weak": 1.1, "standard": 1.25, "strong": 1.5}
_DEGREES = {"weak": 2.0, "standard": 5.0, "strong": 10.0}
_TEXT_HEIGHT = {"weak": 0.05, "standard": 0.08, "strong": 0.14}  # of the image's height
_TEXT_OPACITY = {"weak": 110, "standard": 160, "strong": 220}


def half(image: Image.Image, strength: str) -> Image.Image:
    scale = _SCALE[strength]
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def jpeg(image: Image.Image, strength: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_QUALITY[strength])
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, strength: str) -> Image.Image:
    keep = _CROP[strength]
    w, h = round(image.width * keep), round(image.height * keep)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def flip(image: Image.Image, strength: str) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def brightness(image: Image.Image, strength: str) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(_BRIGHTNESS[strength])


def rotate(image: Image.Image, strength: str) -> Image.Image:
    return image.rotate(_DEGREES[strength], resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))


def watermark(image: Image.Image, strength: str) -> Image.Image:
    """White text with a dark outline, half transparent, across the lower third."""
    text = "(c) cbir photo 2026"
    size = max(8, round(image.height * _TEXT_HEIGHT[strength]))
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = draw.textlength(text, font=ImageFont.load_default(size=size))
    if width > 0.95 * image.width:  # keep the whole text on the image
        size = max(8, int(size * 0.95 * image.width / width))
    font = ImageFont.load_default(size=size)
    width = draw.textlength(text, font=font)
    x, y = max(0, (image.width - width) / 2), image.height * 0.7
    opacity = _TEXT_OPACITY[strength]
    draw.text(
        (x, y),
        text,
        font=font,
        fill=(255, 255, 255, opacity),
        stroke_width=max(1, size // 12),
        stroke_fill=(0, 0, 0, opacity),
    )
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


ALTERATIONS: dict[str, Alteration] = {
    "half": half,
    "jpeg30": jpeg,
    "crop80": crop,
    "flip": flip,
    "bright25": brightness,
    "rotate5": rotate,
    "watermark": watermark,
}


def alter(image: Image.Image, *, name: str, strength: str = "standard") -> Image.Image:
    """The altered copy (RGB); KeyError for an unknown name or strength."""
    if strength not in STRENGTHS:
        raise KeyError(f"unknown strength {strength!r}; known: {', '.join(STRENGTHS)}")
    return ALTERATIONS[name](image.convert("RGB"), strength)


def encode(image: Image.Image) -> bytes:
    """A copy's file bytes: JPEG at quality 95, like a photo saved again (the JPEG alteration's
    loss is already in its pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
