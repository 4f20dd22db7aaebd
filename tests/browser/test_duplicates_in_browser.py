"""The /duplicates page in a real browser against the live server: a small collection of MNIST
digits with altered copies (the ``tiny`` embedder, no training), a run started from the page, a
group resolved with "Keep this" that stays resolved after a reload, and a new copy that reopens it
with the newcomer marked."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from app.ingest.sources.datasets import load_mnist
from tests.browser.conftest import LiveServer, shot
from tests.browser.test_pages_in_browser import both_widths, settle
from tests.conftest import DATASETS_DIR

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1800)]  # the first browser test builds the demo

# Codes of the tiny embedder (8x8 greyscale): a digit and its dimmed or enlarged copy score above
# 0.999; the first test digits of labels 0-5 score at most 0.76 with each other.
THRESHOLD = "0.99"
COLLECTION = "near-copies"  # after "mnist" by name, in case it outlives the test
HOSTILE_LABEL = '"><img src=x onerror=alert(1)>'


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def dimmed(pixels: np.ndarray, factor: float = 0.8) -> np.ndarray:
    return (pixels.astype(np.float32) * factor).astype(np.uint8)


def enlarged(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC))


def wait_for_run(live_server: LiveServer, collection: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        jobs = live_server.api("GET", f"/jobs?collection={collection}&kind=duplicates&limit=1").json()["jobs"]
        if jobs and jobs[0]["state"] not in ("queued", "running"):
            assert jobs[0]["state"] == "succeeded", jobs[0]
            return
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)


@pytest.fixture
def near_copies(live_server: LiveServer) -> Iterator[str]:
    """A collection of the session's server, gone after the test: the other browser tests expect
    the demo's ``mnist`` to be the first collection a page selects."""
    created = live_server.api("POST", "/collections", json={"name": COLLECTION, "embedder": "tiny"})
    assert created.status_code == 201, created.text
    yield COLLECTION
    assert live_server.api("DELETE", f"/collections/{COLLECTION}").status_code == 204


def test_duplicates_page_runs_resolves_and_reopens_a_group(
    page: Page, live_server: LiveServer, near_copies: str, tmp_path: Path
) -> None:
    images, labels = load_mnist("test", datasets_dir=DATASETS_DIR, download_dir=tmp_path)
    api = live_server.api

    def upload(name: str, pixels: np.ndarray, label: str | None = None) -> int:
        response = api(
            "POST",
            f"/collections/{COLLECTION}/images",
            files={"file": (name, png(pixels), "image/png")},
            data={"metadata": json.dumps({"label": label} if label else {})},
        )
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    first = {d: int(np.nonzero(labels == d)[0][0]) for d in range(6)}
    ids = {f"digit-{d}": upload(f"digit-{d}.png", images[i]) for d, i in first.items()}
    ids["digit-0-dim"] = upload("digit-0-dim.png", dimmed(images[first[0]]))
    ids["digit-0-big"] = upload("digit-0-big.png", enlarged(images[first[0]]), label=HOSTILE_LABEL)
    ids["digit-1-big"] = upload("digit-1-big.png", enlarged(images[first[1]]))

    page.goto(f"/duplicates?collection={COLLECTION}")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('No duplicate run')"
    )
    assert page.locator("#threshold").get_attribute("placeholder") == page.locator("#app").get_attribute(
        "data-default-threshold"
    )
    page.fill("#threshold", THRESHOLD)
    page.click("#run-start")

    groups = page.locator("#groups > li")
    groups.nth(1).wait_for()
    assert groups.count() == 2
    assert page.locator("#status").inner_text() == "2 open groups, largest first · showing 1–2"
    assert "threshold 0.99" in page.locator("#run-when").inner_text()
    assert "9 images" in page.locator("#run-when").inner_text()
    assert page.locator("#count-open").inner_text() == "2"
    group = groups.nth(0)
    members = group.locator(".dup-member")
    assert members.count() == 3
    assert {int(m.get_attribute("data-id")) for m in members.all()} == {
        ids["digit-0"],
        ids["digit-0-dim"],
        ids["digit-0-big"],
    }
    assert group.locator(".dup-state").text_content() == "open"
    assert group.get_by_text(HOSTILE_LABEL).first.is_visible()  # data is shown as text
    assert page.locator("img[src='x']").count() == 0
    for text in group.locator(".dup-score .score").all_inner_texts():
        assert float(text) >= 0.99
    assert group.get_by_role("button", name="Keep this").count() == 3
    assert group.get_by_role("button", name="Not duplicates").count() == 1
    group.locator("summary").click()  # the pair list is built when first unfolded
    group.locator(".dup-pairs tbody tr").nth(2).wait_for()
    assert group.locator(".dup-pairs tbody tr").count() == 3
    both_widths(page, "duplicates")

    # "Keep this" under the original: resolved in place, the copies marked as its duplicates.
    group_id = group.get_attribute("data-group")
    group.locator(f".dup-member[data-id='{ids['digit-0']}'] button.keep").click()
    resolved = page.locator(f"#groups > li[data-group='{group_id}']")
    resolved.locator(".dup-state", has_text="resolved").wait_for()
    assert resolved.locator(".tag-keep").count() == 1
    assert resolved.locator(".tag-duplicate").count() == 2
    assert resolved.locator(f".dup-member[data-id='{ids['digit-0']}'] .tag-keep").count() == 1
    assert resolved.locator("button.keep").count() == 0
    assert page.evaluate("document.activeElement.textContent") == "Reopen"
    assert (
        page.locator("#status").inner_text()
        == f"Group {group_id} resolved: #{ids['digit-0']} kept, the others are its duplicates."
    )
    page.wait_for_function("() => document.getElementById('count-resolved').textContent === '1'")

    # A reload asks the server: the open groups are the other one; the resolved one kept its choice.
    page.reload()
    groups.nth(0).wait_for()
    assert groups.count() == 1 and groups.nth(0).get_attribute("data-group") != group_id
    page.locator("#status-filter button[data-status='resolved']").click()
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('1 resolved group')"
    )
    assert "status=resolved" in page.url
    assert groups.count() == 1 and groups.nth(0).get_attribute("data-group") == group_id
    assert groups.nth(0).locator(".dup-state").text_content() == "resolved"
    assert groups.nth(0).locator(f".dup-member[data-id='{ids['digit-0']}'] .tag-keep").count() == 1
    assert f"Kept #{ids['digit-0']}" in groups.nth(0).locator(".dup-summary").inner_text()

    # A new copy joins the resolved group: the next run reopens it with the newcomer marked.
    ids["digit-0-darker"] = upload("digit-0-darker.png", dimmed(images[first[0]], 0.6))
    page.goto(f"/duplicates?collection={COLLECTION}&status=all")
    page.fill("#threshold", THRESHOLD)
    page.click("#run-start")
    page.wait_for_function("() => document.getElementById('run-status').textContent.startsWith('Done')")
    wait_for_run(live_server, COLLECTION)
    reopened = groups.nth(0)
    assert reopened.locator(".dup-state").text_content() == "reopened"
    assert reopened.locator(".dup-member").count() == 4
    new = reopened.locator(".dup-member.new")
    assert new.count() == 1 and new.get_attribute("data-id") == str(ids["digit-0-darker"])
    assert new.locator(".tag-new").text_content() == "new"
    assert "1 new image" in reopened.locator(".dup-summary").inner_text()
    settle(page)
    shot(page, "duplicates-reopened-1440")

    # "Not duplicates" on the other group, then "Reopen" puts it back.
    other = page.locator(f"#groups > li[data-group='{groups.nth(1).get_attribute('data-group')}']")
    other.get_by_role("button", name="Not duplicates").click()
    other.locator(".dup-state", has_text="resolved").wait_for()
    assert "Not duplicates" in other.locator(".dup-summary").inner_text()
    other.get_by_role("button", name="Reopen").click()
    other.locator(".dup-state", has_text="open").wait_for()
    assert other.locator("button.keep").count() == 2

    # A run started elsewhere changed the groups shown: the page refuses to act on a stale group.
    upload("digit-1-dim.png", dimmed(images[first[1]]))
    assert api("POST", f"/collections/{COLLECTION}/duplicates", json={"threshold": 0.99}).status_code == 202
    wait_for_run(live_server, COLLECTION)
    other.get_by_role("button", name="Not duplicates").click()
    alert = page.locator("#alert")
    alert.wait_for()
    # The new run's groups have new ids: the old one answers 404, which the browser logs as a failed
    # load (the one console error this test expects)
    told = alert.inner_text() + page.locator("#status").inner_text()
    assert "A newer run has replaced the groups shown: reload the page" in told
    failed = [m for m in page.errors.console if "404" in m]  # type: ignore[attr-defined]
    assert len(failed) == 1
    page.errors.console.remove(failed[0])  # type: ignore[attr-defined]
    assert other.get_by_role("button", name="Not duplicates").is_enabled()
    assert api("GET", f"/collections/{COLLECTION}/duplicates?status=resolved").json()["total"] == 0
