"""Where an image's own bytes end: what follows (HTML, a script, an archive) is never stored.

PNG, JPEG, GIF and WebP all allow bytes after the image's end, and every decoder ignores them,
so a valid image can carry a second file (a polyglot). Ingest keeps the bytes up to the end the
format's own structure gives, walked block by block (never a search for an end marker, which may
occur inside the data): the image a user sees is exactly the one they sent, and the SHA-256 that
names and deduplicates it is of these bytes. Anything the walk does not understand (a truncated
or malformed file) is left as it is, for the decoder to judge.
"""

from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
JPEG_SOI = b"\xff\xd8"
# JPEG markers without a length: RST0-7, TEM (and SOI, only at the start).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_EOI, _SOS, _APP2 = 0xD9, 0xDA, 0xE2
_MP_ENTRY_TAG = 0xB002


def strip_trailing(data: bytes) -> bytes:
    """``data`` up to the end of its image (the same object when nothing follows it)."""
    end = image_end(data)
    if end is None or end >= len(data):
        return data
    if data.startswith(GIF_SIGNATURES) and data[end - 1] != 0x3B:
        return data[:end] + b";"  # a GIF cut at a block boundary gets the trailer it lacked
    return data[:end]


def image_end(data: bytes) -> int | None:
    """The offset just after the image's last byte, or None (not one of our formats, truncated, or
    a structure the walk does not follow)."""
    if data.startswith(PNG_SIGNATURE):
        return _png_end(data)
    if data.startswith(JPEG_SOI + b"\xff"):
        return _jpeg_end(data)
    if data.startswith(GIF_SIGNATURES):
        return _gif_end(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = int.from_bytes(data[4:8], "little")
        end = 8 + size + (size & 1)  # a RIFF chunk of odd size is padded to even
        return end if size >= 4 and end <= len(data) else None
    return None


def _png_end(data: bytes) -> int | None:
    """After the IEND chunk: chunks are length, type, data, CRC."""
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        end = at + 12 + int.from_bytes(data[at : at + 4], "big")
        if end > len(data):
            return None
        if data[at + 4 : at + 8] == b"IEND":
            return end
        at = end
    return None


def _gif_sub_blocks(data: bytes, at: int) -> int | None:
    """After a chain of data sub-blocks (a size byte, that many bytes; size 0 ends the chain)."""
    while at < len(data):
        size = data[at]
        at += 1
        if size == 0:
            return at
        at += size
    return None


def _gif_end(data: bytes) -> int | None:
    """After the trailer (0x3B); or, where a byte that starts no block follows a complete block,
    at that byte (decoders skip such bytes: they are not image data)."""
    if len(data) < 13:
        return None
    flags = data[10]
    at: int | None = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while at is not None and at < len(data):
        block = data[at]
        if block == 0x3B:
            return at + 1
        if block == 0x21:  # extension: introducer, label, sub-blocks
            at = _gif_sub_blocks(data, at + 2)
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, sub-blocks
            if at + 10 > len(data):
                return None
            local = data[at + 9]
            at += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            at = _gif_sub_blocks(data, at + 1)
        else:
            return at
    return None


def _jpeg_end(data: bytes) -> int | None:
    """After the EOI that closes the marker structure: segments are skipped by their length (an
    EXIF thumbnail's own EOI lies inside one), entropy-coded data by its byte stuffing. A
    multi-picture file (MPO, an Ultra HDR gain map) ends after the last picture its MP index
    (APP2 "MPF") lists."""
    at, mp_end = 2, 0
    size = len(data)
    while at < size:
        if data[at] != 0xFF:
            return None
        while at < size and data[at] == 0xFF:  # fill bytes may precede a marker
            at += 1
        if at >= size:
            return None
        marker = data[at]
        at += 1
        if marker == _EOI:
            return max(at, mp_end) if mp_end <= size else None
        if marker in _STANDALONE:
            continue
        if marker == 0xD8 or at + 2 > size:
            return None
        end = at + int.from_bytes(data[at : at + 2], "big")
        if end < at + 2 or end > size:
            return None
        if marker == _APP2 and data[at + 2 : at + 6] == b"MPF\x00":
            mp_end = max(mp_end, _mp_index_end(data, tiff=at + 6, segment_end=end))
        scan_end = _entropy_end(data, end) if marker == _SOS else end
        if scan_end is None:
            return None
        at = scan_end
    return None


def _entropy_end(data: bytes, at: int) -> int | None:
    """The offset of the marker after entropy-coded data: an 0xFF not followed by a stuffed 0x00,
    a restart marker or another fill byte."""
    while True:
        at = data.find(b"\xff", at)
        if at < 0 or at + 1 >= len(data):
            return None
        following = data[at + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            at += 2
        elif following == 0xFF:
            at += 1
        else:
            return at


def _mp_index_end(data: bytes, *, tiff: int, segment_end: int) -> int:
    """The end of the last picture an MP index lists (offsets count from its TIFF header); 0 when
    the index cannot be read."""
    order = {b"II*\x00": "little", b"MM\x00*": "big"}.get(data[tiff : tiff + 4])
    if order is None:
        return 0

    def number(at: int, width: int) -> int:
        return int.from_bytes(data[at : at + width], order)  # type: ignore[arg-type]

    ifd = tiff + number(tiff + 4, 4)
    if ifd + 2 > segment_end:
        return 0
    end = 0
    for entry in range(number(ifd, 2)):
        tag_at = ifd + 2 + 12 * entry
        if tag_at + 12 > segment_end:
            break
        if number(tag_at, 2) != _MP_ENTRY_TAG:
            continue
        pictures_at, length = tiff + number(tag_at + 8, 4), number(tag_at + 4, 4)
        for picture in range(1, min(length // 16, 64)):  # the first picture is this one
            at = pictures_at + 16 * picture
            if at + 16 > segment_end:
                break
            picture_size, offset = number(at + 4, 4), number(at + 8, 4)
            if offset:
                end = max(end, tiff + offset + picture_size)
    return end
