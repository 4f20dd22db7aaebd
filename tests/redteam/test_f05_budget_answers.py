"""Finding 5, round 2: what a request over the cost budget gets, and whose figures decide it.

- An ``over_budget`` problem says, machine-readably, what fits (``fits_sample``, ``budget_s``,
  ``estimate_s``), so a page can ask again with that sample (the Evaluate page does).
- The smallest sample the map page offers fits the default budget with UMAP too.
- The measured embedder speeds and mean pixel counts belong to one service, not to the process.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core import cancel
from app.core.settings import Settings
from app.embedding import cost
from app.main import create_app
from app.search import maps
from tests.api.helpers import assert_problem
from tests.redteam.test_f05_costly_compare import fill, noise_png

API = "/api/v1"


def app_client(settings: Settings, **changes: object) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=changes)), raise_server_exceptions=False)


# -- what fits ---------------------------------------------------------------------------------------
def test_a_map_over_the_budget_says_which_sample_fits_and_that_sample_answers(settings: Settings) -> None:
    # PCA of 64-d codes: about 0.1 ms fixed + 0.02 ms a point, so 0.2 ms fits four or five points.
    with app_client(settings, sync_cost_budget_s=2e-4) as client:
        fill(client)
        problem = assert_problem(client.get(f"{API}/collections/shapes/map", params={"sample": 12}), 422)
        assert problem["code"] == "over_budget"
        assert problem["budget_s"] == 2e-4 and problem["estimate_s"] > 2e-4
        fits = problem["fits_sample"]
        assert isinstance(fits, int) and 1 <= fits < 12, problem
        assert f"sample={fits} fits" in problem["detail"]  # the text says the same
        again = client.get(f"{API}/collections/shapes/map", params={"sample": fits})
        assert again.status_code == 200, again.text
        assert len(again.json()["points"]) == fits


def test_when_no_sample_fits_the_problem_says_zero(settings: Settings) -> None:
    with app_client(settings, sync_cost_budget_s=1e-6) as client:
        fill(client)
        problem = assert_problem(client.get(f"{API}/collections/shapes/map"), 422, "over_budget")
        assert problem["fits_sample"] == 0


# -- the map page's options -----------------------------------------------------------------------
def digits_zip(count: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i % 10}/{i}.png", noise_png(5000 + i))
    return out.getvalue()


@pytest.fixture
def with_umap(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """UMAP as if umap-learn were installed (a stand-in layout: the budget is what is tested)."""
    monkeypatch.setattr(maps, "available_methods", lambda: ("pca", "umap"))
    monkeypatch.setattr(maps, "umap_2d", lambda vectors: np.zeros((len(vectors), 2), dtype=np.float32))
    yield


@pytest.mark.timeout(180)
def test_the_smallest_map_the_page_offers_fits_the_default_budget_with_umap(
    settings: Settings, with_umap: None
) -> None:
    with app_client(settings) as client:
        assert (
            client.post(f"{API}/collections", json={"name": "digits", "embedder": "tiny"}).status_code == 201
        )
        job = client.post(
            f"{API}/collections/digits/imports",
            files={"file": ("d.zip", digits_zip(2000), "application/zip")},
        )
        assert job.status_code == 202, job.text
        client.app.state.jobs._executor.shutdown(wait=True)  # type: ignore[attr-defined]  # the import is done
        assert client.get(f"{API}/jobs/{job.json()['job_id']}").json()["state"] == "succeeded"

        page = client.get("/map", params={"collection": "digits"}).text
        offered = re.search(r'<select id="sample"[^>]*>(.*?)</select>', page, re.S)
        assert offered is not None
        smallest = min(int(v) for v in re.findall(r'<option value="(\d+)"', offered.group(1)))
        answer = client.get(f"{API}/collections/digits/map", params={"sample": smallest, "method": "umap"})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["points"]) == smallest
        # and a page default that does not fit says what does
        over = client.get(f"{API}/collections/digits/map", params={"sample": 2000, "method": "umap"})
        assert smallest <= assert_problem(over, 422, "over_budget")["fits_sample"] < 2000


# -- whose figures -----------------------------------------------------------------------------------
def test_two_services_in_one_process_keep_their_own_cost_figures(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = settings.model_copy(update={"data_dir": tmp_path / "other", "sync_cost_budget_s": 1e-6})
    with app_client(settings, sync_cost_budget_s=1e-6) as first, app_client(other) as second:
        ids = fill(first)
        # Over the budget on the built-in figure: the speed of ``pixels`` is measured, then refused.
        refused = first.get(
            f"{API}/collections/shapes/images/{ids[0]}/compare", params={"against": "pixels", "sample": 12}
        )
        assert_problem(refused, 422, "over_budget")
        assert "(measured)" in refused.json()["detail"]
        mine = first.app.state.context.costs  # type: ignore[attr-defined]
        theirs = second.app.state.context.costs  # type: ignore[attr-defined]
        assert mine is not theirs
        pixels = first.app.state.context.embedders.get("pixels")  # type: ignore[attr-defined]
        key = (pixels.version, str(pixels.device))
        assert mine.speed(key) is not None and theirs.speed(key) is None
    assert not hasattr(cost, "_SPEEDS") and not hasattr(cost, "_PIXELS")


def test_the_never_token_holds_nothing_and_cannot_be_set() -> None:
    assert not cancel.NEVER.cancelled
    cancel.NEVER.check()
    assert not hasattr(cancel.NEVER, "_lock")  # no state to share between its callers
    with pytest.raises(TypeError):
        cancel.NEVER.cancel("a caller that meant its own token")


@pytest.mark.timeout(120)
def test_a_compare_over_the_budget_says_which_sample_fits_and_that_sample_answers(settings: Settings) -> None:
    # 5 ms: between the estimate of one pixels image (tens of microseconds) and of 200.
    with app_client(settings, sync_cost_budget_s=5e-3) as client:
        ids = fill(client, count=200)
        path = f"{API}/collections/shapes/images/{ids[0]}/compare"
        params = {"against": "pixels", "sample": 200}
        problem = assert_problem(client.get(path, params=params), 422, "over_budget")
        fits = problem["fits_sample"]
        assert isinstance(fits, int) and 1 <= fits < 200 and problem["budget_s"] == 5e-3, problem
        again = client.get(path, params={**params, "sample": fits})
        assert again.status_code == 200, again.text
        assert again.json()["sample"] == fits
