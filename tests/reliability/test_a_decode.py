"""Plan section A: the decode path and bad images (scenarios 1-7, 9, 11-14).

Every hostile file goes through both ways in: ``POST /collections/{name}/search`` (a query) and
``POST /collections/{name}/images`` (an upload), and comes back as an RFC 9457 problem with the
plan's status and code, never a 500. The files are built at test time by fuzz/samples.py (the same
functions seed the committed fuzzing corpus, tests/corpus/decode/).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import GifImagePlugin, Image, ImageFile, MpoImagePlugin, PngImagePlugin, WebPImagePlugin

from app.core.errors import CbirError, EmptyUpload, ImageRejected, ImageTooLarge
from app.core.settings import Settings
from app.imaging.decode import ImageLimits, decode_image, pixel_cap
from app.main import create_app
from fuzz import samples
from tests.api.helpers import assert_problem

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus" / "decode"
ENDPOINTS = ("search", "images")
LIMITS = ImageLimits(max_pixels=4_000_000, max_side=4096)  # the conftest settings' caps
PILLOW_LIMIT: int = Image.MAX_IMAGE_PIXELS or 0
assert PILLOW_LIMIT > 0, "Pillow's decompression bomb check is off"


def post(
    client: TestClient,
    endpoint: str,
    data: bytes,
    *,
    filename: str = "upload.png",
    content_type: str = "image/png",
):
    """The file as a search query or an upload to the ``shapes`` collection."""
    return client.post(
        f"/api/v1/collections/shapes/{endpoint}", files={"file": (filename, data, content_type)}
    )


def assert_rejected_both_ways(
    client: TestClient, data: bytes, status: int, code: str, *, within: float | None = None, **file: str
) -> None:
    for endpoint in ENDPOINTS:
        started = time.perf_counter()
        response = post(client, endpoint, data, **file)
        elapsed = time.perf_counter() - started
        assert_problem(response, status, code)
        if within is not None:
            assert elapsed < within, f"{endpoint}: {elapsed:.2f} s"


def assert_still_serving(client: TestClient, make_png: Callable[..., bytes]) -> None:
    assert client.get("/api/v1/health").status_code == 200
    assert post(client, "images", make_png(99)).status_code in (200, 201)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., TestClient]]:
    """``clients(max_frames=4)``: a client on the test settings (conftest's caps) with these changes,
    its ``shapes`` collection made; one per distinct change for the whole module. Its tests leave
    nothing behind that another could trip over (uploads are of distinct or identical bytes)."""
    opened: dict[tuple, TestClient] = {}

    def factory(**changes: object) -> TestClient:
        key = tuple(sorted(changes.items()))
        if key not in opened:
            base = {
                "data_dir": tmp_path_factory.mktemp("decode") / "data",
                "default_embedder": "tiny",
                "max_upload_bytes": 2 * 1024 * 1024,
                "max_pixels": LIMITS.max_pixels,
                "max_side": LIMITS.max_side,
                "import_processes": False,
            }
            settings = Settings.model_validate(base | changes)
            client = TestClient(create_app(settings), raise_server_exceptions=False)
            client.__enter__()
            opened[key] = client
            response = client.post("/api/v1/collections", json={"name": "shapes", "embedder": "tiny"})
            assert response.status_code == 201, response.text
        return opened[key]

    yield factory
    for client in opened.values():
        client.__exit__(None, None, None)


@pytest.fixture
def client(clients: Callable[..., TestClient]) -> TestClient:
    """The module's client on the test settings (overrides conftest's per-test one: the decode path
    keeps no state, and a fresh app per case would cost most of this file's run time)."""
    return clients()


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes of every pixel buffer Pillow allocates (``Image.core.new`` and ``fill``) meanwhile."""
    sizes: list[tuple[int, int]] = []
    for name in ("new", "fill"):
        real = getattr(Image.core, name)

        def spy(mode: str, size: tuple[int, int], *args: object, _real: Callable = real) -> object:
            sizes.append((size[0], size[1]))
            return _real(mode, size, *args)

        monkeypatch.setattr(Image.core, name, spy)
    return sizes


def embedding(client: TestClient, image_id: int) -> np.ndarray:
    response = client.get(f"/api/v1/images/{image_id}", params={"include": "embedding"})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embedding"], dtype=np.float64)


def upload(client: TestClient, data: bytes, name: str = "upload.png") -> int:
    response = post(client, "images", data, filename=name)
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


# --- 1. Pixel bomb declared in the header ---------------------------------------------------------


@pytest.mark.timeout(10)
def test_r01_png_pixel_bomb_in_header_is_413_without_allocating(
    client: TestClient, make_png: Callable[..., bytes], allocations: list[tuple[int, int]]
) -> None:
    bomb = samples.png(60000, 60000)
    assert len(bomb) < 200  # 3.6 gigapixels on paper
    assert_rejected_both_ways(client, bomb, 413, "image_too_large", within=1.0)
    assert all(w * h <= LIMITS.max_pixels for w, h in allocations), allocations
    seen = len(allocations)
    assert_still_serving(client, make_png)
    assert len(allocations) > seen  # the spy does see a real decode


HEADER_BOMBS = {
    "png-60000": samples.png(60000, 60000),
    "png-above-cap": samples.png(2001, 2000),
    "jpeg-above-pillow": samples.jpeg_header(10000, 9000),
    "webp-above-pillow": samples.webp_vp8x(10000, 9000),
    "gif-screen-65535": samples.gif(screen=(65535, 65535)),
    "gif-frame-65535": samples.gif(frame=(65535, 65535), disposal=2),
    "gif-offset-60000": samples.gif(offset=(60000, 60000)),
}


@pytest.mark.parametrize("name", sorted(HEADER_BOMBS))
def test_r01_header_bombs_never_reach_pillow(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # Our own header parser refuses them: Pillow's GIF and WebP openers allocate while opening.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open called on a header bomb")

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageTooLarge):
        decode_image(HEADER_BOMBS[name], limits=LIMITS)


# --- 2. Pixel bomb at the warning level and at our own cap ----------------------------------------

HEADERS = {"png": samples.png, "jpeg": samples.jpeg_header, "webp": samples.webp_vp8x}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", sorted(HEADERS))
@pytest.mark.parametrize(("width", "height"), [(2001, 2000), (4096, 977), (977, 4096)])
def test_r02_just_above_max_pixels_is_413(client: TestClient, kind: str, width: int, height: int) -> None:
    assert width * height > LIMITS.max_pixels and max(width, height) <= LIMITS.max_side
    assert_rejected_both_ways(client, HEADERS[kind](width, height), 413, "image_too_large", within=1.0)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", sorted(HEADERS))
@pytest.mark.parametrize(
    ("width", "height"),
    [(9500, 9500), (16000, 6000), (14000, 14000)],  # above Pillow's warning level; the last above 2x
)
def test_r02_above_pillows_limit_is_413_whatever_the_warning_filters(
    clients: Callable[..., TestClient], kind: str, width: int, height: int
) -> None:
    # Our configured cap is above Pillow's here: only the clamp to Pillow's limit refuses these.
    client = clients(max_pixels=500_000_000, max_side=65_535)
    assert width * height > PILLOW_LIMIT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # not "error": the 413 must not depend on the filters
        assert_rejected_both_ways(client, HEADERS[kind](width, height), 413, "image_too_large", within=1.0)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_r02_our_pixel_cap_is_never_above_pillows() -> None:
    assert pixel_cap(LIMITS) == LIMITS.max_pixels < PILLOW_LIMIT
    assert pixel_cap(ImageLimits(max_pixels=10**12, max_side=10**6)) == PILLOW_LIMIT
    with pytest.raises(ImageTooLarge) as info:
        decode_image(samples.png(9500, 9500), limits=ImageLimits(max_pixels=10**12, max_side=10**6))
    assert str(PILLOW_LIMIT) in info.value.detail


@pytest.mark.parametrize("warning", [Image.DecompressionBombWarning, Image.DecompressionBombError])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_r02_a_decompression_bomb_warning_raised_by_pillow_is_413(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, warning: type, endpoint: str
) -> None:
    # Where our header parser and Pillow's disagree, Pillow's own check is the last line: as an
    # exception (warnings are errors) it must still come back as a 413.
    def bomb(*args: object, **kwargs: object) -> None:
        raise warning("Image size (90000000 pixels) exceeds limit")

    monkeypatch.setattr(Image, "open", bomb)
    assert_problem(post(client, endpoint, samples.png(8, 8)), 413, "image_too_large")


# --- 3. GIF logical screen bomb ----------------------------------------------------------------


GIF_BOMBS = {
    "screen-65535": samples.gif(screen=(65535, 65535)),
    "frame-65535-disposal-2": samples.gif(frame=(65535, 65535), disposal=2),
    "frame-offset-60000": samples.gif(offset=(60000, 60000)),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("shape", sorted(GIF_BOMBS))
def test_r03_gif_logical_screen_bomb_is_413(
    client: TestClient, allocations: list[tuple[int, int]], shape: str
) -> None:
    data = GIF_BOMBS[shape]
    with Image.open(io.BytesIO(samples.gif())) as check:  # the hand-written GIF is a real GIF
        assert check.convert("RGB").size == (1, 1)
    assert_rejected_both_ways(client, data, 413, "image_too_large", within=1.0)
    assert all(w * h <= LIMITS.max_pixels for w, h in allocations), allocations


@pytest.mark.timeout(20)
@pytest.mark.parametrize("shape", sorted(GIF_BOMBS))
def test_r03_gif_bomb_is_413_even_with_caps_above_pillows(
    clients: Callable[..., TestClient], allocations: list[tuple[int, int]], shape: str
) -> None:
    client = clients(max_pixels=500_000_000, max_side=65_535)
    assert_rejected_both_ways(client, GIF_BOMBS[shape], 413, "image_too_large", within=1.0)
    assert all(w * h <= PILLOW_LIMIT for w, h in allocations), allocations


# --- 4. Very long thin image ---------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)])
def test_r04_long_thin_image_is_413_from_max_side(client: TestClient, size: tuple[int, int]) -> None:
    data = samples.encode(Image.new("L", size), "PNG")
    assert size[0] * size[1] < LIMITS.max_pixels  # only the side cap refuses it
    assert_rejected_both_ways(client, data, 413, "image_too_large", within=1.0)


# --- 5. Truncated files --------------------------------------------------------------------------

VALID = {
    "png": samples.encode(samples.noise("RGB", (96, 96), seed=5), "PNG"),
    "jpeg": samples.encode(samples.noise("RGB", (96, 96), seed=5), "JPEG", quality=85),
    "gif": samples.encode(samples.noise("RGB", (96, 96), seed=5).convert("P"), "GIF"),
    "webp": samples.encode(samples.noise("RGB", (96, 96), seed=5), "WEBP", quality=85),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
@pytest.mark.parametrize("kind", ["png", "jpeg", "gif", "webp"])
def test_r05_truncated_file_is_422_image_truncated(client: TestClient, kind: str, fraction: float) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert post(client, "images", VALID[kind], filename=f"whole.{kind}").status_code in (200, 201)
    assert_rejected_both_ways(client, samples.truncated(VALID[kind], fraction), 422, "image_truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- 6. Empty, text, HTML, random ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_upload"),
        (b"hello", 422, "not_an_image"),
        (b"<html>", 422, "not_an_image"),
        (samples.junk()["random"], 422, "not_an_image"),
    ],
    ids=["empty", "text", "html", "random-4096"],
)
def test_r06_not_an_image_is_400_or_422(client: TestClient, data: bytes, status: int, code: str) -> None:
    assert_rejected_both_ways(client, data, status, code)


def test_r06_empty_bytes_are_an_empty_upload_in_the_decoder_too() -> None:
    with pytest.raises(EmptyUpload):
        decode_image(b"", limits=LIMITS)


# --- 7. Formats outside the allow-list -----------------------------------------------------------

FOREIGN = samples.foreign()
OWN_NAMES = {
    "tiff": ("sample.tiff", "image/tiff"),
    "bmp": ("sample.bmp", "image/bmp"),
    "ico": ("sample.ico", "image/x-icon"),
    "tga": ("sample.tga", "image/x-tga"),
    "psd": ("sample.psd", "image/vnd.adobe.photoshop"),
    "pdf": ("sample.pdf", "application/pdf"),
    "eps": ("sample.eps", "application/postscript"),
    "fits": ("sample.fits", "image/fits"),
    "spider": ("sample.spi", "application/octet-stream"),
    "svg": ("sample.svg", "image/svg+xml"),
}
PILLOW_NAMES = {"tiff": "TIFF", "bmp": "BMP", "ico": "ICO", "tga": "TGA", "psd": "PSD"}
PILLOW_NAMES |= {"eps": "EPS", "fits": "FITS", "spider": "SPIDER"}


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fail on any child process (Ghostscript for EPS and PDF would be one)."""
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError(f"subprocess.Popen called: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    return calls


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_r07_foreign_samples_are_what_they_claim(name: str, no_subprocess: list[object]) -> None:
    data = FOREIGN[name]
    if name in PILLOW_NAMES:
        with Image.open(io.BytesIO(data)) as image:  # every format Pillow would open: a real file
            assert image.format == PILLOW_NAMES[name]
    else:
        assert data.startswith({"pdf": b"%PDF", "svg": b"<svg"}[name])
    assert no_subprocess == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("renamed", [False, True], ids=["own-name", "renamed-png"])
@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_r07_format_outside_the_allow_list_is_415(
    client: TestClient, no_subprocess: list[object], name: str, renamed: bool
) -> None:
    filename, content_type = ("sample.png", "image/png") if renamed else OWN_NAMES[name]
    assert_rejected_both_ways(
        client, FOREIGN[name], 415, "unsupported_format", filename=filename, content_type=content_type
    )
    assert no_subprocess == []


# --- 9. Awkward modes ---------------------------------------------------------------------------

MODES = samples.awkward_modes()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_r09_awkward_mode_is_stored_as_a_finite_unit_vector(client: TestClient, mode: str) -> None:
    data = MODES[mode]
    for endpoint in ENDPOINTS:
        response = post(client, endpoint, data, filename=f"{mode}.png")
        assert response.status_code in (200, 201), response.text
    image_id = upload(client, data, f"{mode}.png")
    vector = embedding(client, image_id)
    assert vector.shape == (64,)  # the tiny embedder's dim
    assert np.isfinite(vector).all()
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    # Left out unless asked for.
    assert "embedding" not in client.get(f"/api/v1/images/{image_id}").json()


def _composited(rgba: Image.Image, background: tuple[int, int, int]) -> bytes:
    flat = Image.new("RGB", rgba.size, background)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return samples.encode(flat, "PNG")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("background", ["#ffffff", "#000000", "#3080c0"])
def test_r09_alpha_is_composited_on_the_configured_background(
    clients: Callable[..., TestClient], background: str
) -> None:
    client = clients(alpha_background=background)
    with Image.open(io.BytesIO(MODES["RGBA"])) as rgba:  # binary alpha: the composite is exact
        rgba.load()
    colour = (int(background[1:3], 16), int(background[3:5], 16), int(background[5:7], 16))
    ours = embedding(client, upload(client, MODES["RGBA"], "rgba.png"))
    expected = embedding(client, upload(client, _composited(rgba, colour), "flat.png"))
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    other = (0, 255, 0)
    assert not np.allclose(ours, embedding(client, upload(client, _composited(rgba, other), "green.png")))


def test_r09_unknown_background_colour_fails_at_start(settings: Settings) -> None:
    with pytest.raises(ValueError, match="alpha_background"):
        Settings.model_validate({**settings.model_dump(), "alpha_background": "not-a-colour"})


# --- 11. Animated and multi-frame input ------------------------------------------------------------


@pytest.fixture(scope="module")
def gif_500() -> bytes:
    return samples.animated_gif(500)


@pytest.fixture
def seeks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every frame any image plugin is asked to go to (``seek`` and GIF's internal ``_seek``)."""
    calls: list[tuple[str, int]] = []
    targets = [
        (Image.Image, "seek"),
        (GifImagePlugin.GifImageFile, "seek"),
        (GifImagePlugin.GifImageFile, "_seek"),
        (WebPImagePlugin.WebPImageFile, "seek"),
        (PngImagePlugin.PngImageFile, "seek"),
        (PngImagePlugin.PngImageFile, "_seek"),
        (MpoImagePlugin.MpoImageFile, "seek"),
    ]
    for owner, name in targets:
        real = owner.__dict__[name]

        def spy(
            self: Image.Image, frame: int, *args: object, _real: Callable = real, _name: str = name
        ) -> object:
            calls.append((f"{type(self).__name__}.{_name}", frame))
            return _real(self, frame, *args)

        monkeypatch.setattr(owner, name, spy)
    return calls


def _first_frame_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return samples.encode(image.convert("RGB"), "PNG")


@pytest.mark.timeout(60)
def test_r11_500_frame_gif_gives_frame_0_fast_without_walking(
    client: TestClient, gif_500: bytes, seeks: list[tuple[str, int]]
) -> None:
    for endpoint in ENDPOINTS:
        started = time.perf_counter()
        response = post(client, endpoint, gif_500, filename="animated.gif", content_type="image/gif")
        assert response.status_code in (200, 201), response.text
        assert time.perf_counter() - started < 2.0
    assert seeks and all(frame == 0 for _, frame in seeks), seeks[:10]
    seeks.clear()
    image_id = upload(client, gif_500, "animated.gif")
    frame_0 = embedding(client, upload(client, _first_frame_png(gif_500), "frame0.png"))
    np.testing.assert_allclose(embedding(client, image_id), frame_0, atol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("kind", "data"),
    [("webp", samples.animated_webp(3)), ("apng", samples.apng(3)), ("mpo", samples.mpo(2))],
)
def test_r11_multi_frame_file_gives_frame_0(
    client: TestClient, seeks: list[tuple[str, int]], kind: str, data: bytes
) -> None:
    response = post(client, "images", data, filename=f"animated.{kind}")
    assert response.status_code == 201, response.text
    assert response.json()["image"]["format"] in ("WEBP", "PNG", "JPEG")  # an MPO is stored as its JPEG
    assert all(frame == 0 for _, frame in seeks), seeks
    frame_0 = embedding(client, upload(client, _first_frame_png(data), "frame0.png"))
    np.testing.assert_allclose(embedding(client, response.json()["id"]), frame_0, atol=1e-6)
    assert post(client, "search", data, filename=f"animated.{kind}").status_code == 200


# Built before the seek spy is on: Pillow's save_all seeks through its inputs.
ANIMATED = {"webp-5": samples.animated_webp(5), "apng-5": samples.apng(5), "webp-4": samples.animated_webp(4)}


@pytest.mark.timeout(60)
def test_r11_declared_frame_count_over_the_cap_is_422(
    clients: Callable[..., TestClient], gif_500: bytes, seeks: list[tuple[str, int]]
) -> None:
    client = clients(max_frames=4)
    for data in (ANIMATED["webp-5"], ANIMATED["apng-5"]):
        assert_rejected_both_ways(client, data, 422, "too_many_frames", within=2.0)
    assert post(client, "images", ANIMATED["webp-4"]).status_code == 201  # the cap is inclusive
    # A GIF states no frame count: counting would walk every frame, so it is not counted.
    assert post(client, "images", gif_500, filename="animated.gif").status_code == 201
    assert all(frame == 0 for _, frame in seeks)


# --- 12. Escaping exceptions -----------------------------------------------------------------------

ESCAPING = [
    ValueError("bad"),
    struct.error("bad"),
    IndexError("bad"),
    ZeroDivisionError("bad"),
    OverflowError("bad"),
    MemoryError(),
    NotImplementedError("bad"),
    KeyError("bad"),
    TypeError("bad"),
    EOFError(),
    zlib.error("bad"),
    UserWarning("malformed MPO file"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stage", ["open", "load"])
@pytest.mark.parametrize("exc", ESCAPING, ids=lambda e: type(e).__name__)
def test_r12_exception_from_pillow_is_a_json_4xx_never_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, exc: BaseException, stage: str
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    if stage == "open":
        monkeypatch.setattr(Image, "open", boom)
    else:
        monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    for endpoint in ENDPOINTS:
        response = post(client, endpoint, samples.png(8, 8))
        assert response.status_code in (413, 422), response.text
        assert_problem(response, response.status_code)


MALFORMED = samples.malformed(VALID)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_r12_malformed_files_are_rejected_or_decoded(name: str) -> None:
    data = MALFORMED[name]
    try:
        decoded = decode_image(data, limits=LIMITS)
    except CbirError as exc:
        assert isinstance(exc, ImageRejected) and exc.status in (413, 415, 422)
    else:
        assert decoded.image.mode in ("RGB", "L")


# --- 13. Replaying the fuzz corpus -----------------------------------------------------------------

CORPUS_FILES = sorted(path.name for path in CORPUS.iterdir() if path.is_file()) if CORPUS.is_dir() else []


def test_r13_corpus_holds_the_seed_of_items_1_to_12() -> None:
    assert set(samples.seeds()) <= set(CORPUS_FILES), "run python fuzz/seed_corpus.py"
    items = {int(name[:2]) for name in CORPUS_FILES if name[:2].isdigit()}
    assert {1, 2, 3, 4, 5, 6, 7, 9, 11, 12} <= items
    assert all((CORPUS / name).stat().st_size <= 64 * 1024 for name in CORPUS_FILES)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", CORPUS_FILES)
def test_r13_corpus_file_decodes_or_is_rejected(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    started = time.perf_counter()
    try:
        decoded = decode_image(data, limits=LIMITS)
    except (ImageRejected, EmptyUpload) as exc:
        assert 400 <= exc.status < 500
    else:
        assert decoded.image.mode in ("RGB", "L")
        assert decoded.image.size == (decoded.width, decoded.height)
        assert decoded.width * decoded.height <= LIMITS.max_pixels
        assert np.isfinite(np.asarray(decoded.image, dtype=np.float32)).all()
    assert time.perf_counter() - started < 5.0


# --- 14. Atheris fuzzing session -------------------------------------------------------------------


def _corpus_snapshot() -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(CORPUS.iterdir())}


def run_fuzzer(tmp_path: Path, *, seconds: int) -> tuple[int, str]:
    """A bounded atheris session over the committed corpus; new inputs go to ``tmp_path``."""
    pytest.importorskip("atheris")
    scratch, artifacts = tmp_path / "new-corpus", tmp_path / "artifacts"
    scratch.mkdir()
    artifacts.mkdir()
    before = _corpus_snapshot()
    command = [
        sys.executable,
        str(ROOT / "fuzz" / "fuzz_decode.py"),
        str(scratch),  # libFuzzer writes new inputs to the first folder only
        str(CORPUS),
        f"-max_total_time={seconds}",
        "-rss_limit_mb=1536",
        "-timeout=10",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Linux hands a process's peak RSS down through execve (exec_mmap keeps the old mm's high-water
    # mark), so a fuzzer started straight from this pytest process (models loaded: 1.5 GB+) would
    # report pytest's peak as its own and trip -rss_limit_mb at once. A shell in between forks
    # the fuzzer with a fresh count.
    command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *command]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    log = result.stdout + result.stderr
    crashers = sorted(path.name for path in artifacts.iterdir())
    assert result.returncode == 0 and not crashers, (
        f"the fuzzer failed (exit {result.returncode}); crashers in {artifacts}: {crashers} "
        f"(add them to tests/corpus/decode/)\n{log[-4000:]}"
    )
    assert _corpus_snapshot() == before, "the fuzzer wrote into the committed corpus"
    runs = re.search(r"Done (\d+) runs", log)
    assert runs, log[-2000:]
    return int(runs.group(1)), log


@pytest.mark.timeout(200)
def test_r14_short_fuzzing_session_finds_no_crash(tmp_path: Path) -> None:
    runs, _ = run_fuzzer(tmp_path, seconds=15)
    assert runs > len(CORPUS_FILES)  # it got past replaying the seed


@pytest.mark.fuzz
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.environ.get("RUN_FUZZ") != "1", reason="a 300 s fuzzing session: set RUN_FUZZ=1")
def test_r14_fuzzing_session_of_300_s_finds_no_crash(tmp_path: Path) -> None:
    runs, log = run_fuzzer(tmp_path, seconds=300)
    assert runs > 10_000, log[-2000:]
