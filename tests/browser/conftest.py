"""Browser tests: Playwright drives Debian's Chromium against a live server on the MNIST demo.

Session fixtures serve a copy of the session's demo build (``demo_build`` in ``tests/conftest.py``:
``cbir demo`` with ``CBIR_DEMO_EPOCHS=1``, 60,000 MNIST digits stored, a 1-epoch CDAE, about 2-4
minutes on 2 cores, shared with ``tests/learning/test_demo.py``) with uvicorn on 127.0.0.1 and
launch one headless Chromium. ``CBIR_BROWSER_DEMO_CACHE`` names a folder in which the demo is
built once and reused across sessions.

Without ``playwright`` or Chromium the tests are skipped with the reason; with
``CBIR_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets) they fail instead, so CI cannot pass by skipping.
Screenshots go to ``artifacts/screenshots/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests import demo
from tests.conftest import DATASETS_DIR

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path(os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REQUIRED = os.environ.get("CBIR_REQUIRE_BROWSER") == "1"
WIDE: ViewportSize = {"width": 1440, "height": 900}
NARROW: ViewportSize = {"width": 360, "height": 780}


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (CBIR_REQUIRE_BROWSER=1: browser tests must run)")
    pytest.skip(reason)


def _check_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("the playwright package is not installed: pip install -e '.[dev]'")
    if not CHROMIUM.exists():
        unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CBIR_CHROMIUM)")


@pytest.fixture(scope="session")
def demo_data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working copy of the session's MNIST demo (``demo_build``) for the live server."""
    _check_browser()  # no point building the demo for tests that cannot run
    build: Path = request.getfixturevalue("demo_build")
    working = tmp_path_factory.mktemp("demo") / "data"
    demo.copy_data(build, working)
    return working


@dataclass
class LiveServer:
    url: str
    data_dir: Path
    log: Path
    client: httpx.Client = field(repr=False)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, f"{self.url}/api/v1{path}", **kwargs)


@pytest.fixture(scope="session")
def live_server(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """uvicorn serving ``app.main:create_app`` on a socket bound here (no port race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "uvicorn.log"
    out = open(log, "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:create_app",
            "--fd",
            str(sock.fileno()),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=demo.demo_env(demo_data, DATASETS_DIR),
        stdout=out,
        stderr=subprocess.STDOUT,
        pass_fds=(sock.fileno(),),
    )
    sock.close()  # the server holds its own copy
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"the server exited with {process.returncode}:\n{tail}")
            try:
                if client.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"the server did not answer /api/v1/health in 120 s:\n{tail}")
            time.sleep(0.25)
        yield LiveServer(url=url, data_dir=demo_data, log=log, client=client)
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        out.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    _check_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class PageErrors:
    """What a page reported: uncaught script errors, console errors and JavaScript dialogs."""

    exceptions: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    """A fresh 1440-px-wide page; at the end, no uncaught script error and no dialog may have happened."""
    context = browser.new_context(viewport=WIDE, base_url=live_server.url)
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors = PageErrors()
    tab.on("pageerror", lambda exc: errors.exceptions.append(str(exc)))
    tab.on("console", lambda msg: errors.console.append(msg.text) if msg.type == "error" else None)

    def on_dialog(dialog: Any) -> None:
        errors.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    tab.on("dialog", on_dialog)
    tab.errors = errors  # type: ignore[attr-defined]
    try:
        yield tab
        assert errors.dialogs == [], f"a JavaScript dialog opened: {errors.dialogs}"
        assert errors.exceptions == [], f"uncaught script errors: {errors.exceptions}"
        assert errors.console == [], f"console errors (failed requests, ...): {errors.console}"
    finally:
        context.close()


def shot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save a screenshot as an artefact: artifacts/screenshots/NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def at_width(page: Page, size: ViewportSize) -> None:
    page.set_viewport_size(size)
    page.wait_for_timeout(150)  # layout and lazy images settle


def assert_fits(page: Page) -> None:
    """Nothing makes the page scroll sideways at the current width."""
    width = page.evaluate("document.documentElement.clientWidth")
    scroll = page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width + 1, f"the page is {scroll} px wide in a {width} px viewport"
