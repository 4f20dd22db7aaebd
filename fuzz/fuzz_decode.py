"""Atheris fuzz target for the decode path (app.imaging.decode.decode_image), plan item 14.

    python fuzz/fuzz_decode.py NEW_CORPUS_DIR tests/corpus/decode -max_total_time=300 \\
        -rss_limit_mb=1536 -timeout=10

libFuzzer writes new inputs into the first corpus folder: give it a scratch folder first, so the
committed seed (tests/corpus/decode/) is only read. A crash is any exception other than a 4xx
CbirError (ImageRejected and its kin, EmptyUpload), a decoded image that breaks the contract (mode
RGB or L, within the caps), a warning (warnings are errors here, as in the tests), an input over
``-timeout`` seconds or a process over ``-rss_limit_mb``. Crashers go into tests/corpus/decode/.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from PIL import (  # noqa: F401  (imported here so that their Python code is instrumented)
        GifImagePlugin,
        Image,
        ImageFile,
        ImageOps,
        JpegImagePlugin,
        MpoImagePlugin,
        PngImagePlugin,
        WebPImagePlugin,
    )

    from app.imaging import decode as imaging
from app.core.errors import CbirError  # noqa: E402

# The test settings' caps (tests/conftest.py): small enough that an accepted input stays cheap.
LIMITS = imaging.ImageLimits(max_pixels=4_000_000, max_side=4096, max_frames=100)


def test_one_input(data: bytes) -> None:
    try:
        decoded = imaging.decode_image(data, limits=LIMITS)
    except CbirError as exc:
        if not 400 <= exc.status < 500:
            raise
        return
    image = decoded.image
    assert image.mode in ("RGB", "L"), image.mode
    assert image.size == (decoded.width, decoded.height)
    assert 1 <= decoded.width <= LIMITS.max_side and 1 <= decoded.height <= LIMITS.max_side
    assert decoded.width * decoded.height <= LIMITS.max_pixels
    assert decoded.format in imaging.ALLOWED_FORMATS, decoded.format


def main() -> None:
    warnings.simplefilter("error")  # one thread: a process-wide filter is safe here
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
