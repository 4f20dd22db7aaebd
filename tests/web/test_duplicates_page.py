"""The /duplicates page: a server-rendered shell (the groups come from the JSON API), with the
collection picker, the default threshold of the selected collection's embedder and the run form.
What every page shares (navigation, no inline code, escaping, no collections, an unknown
collection) is tested over every page in test_web_pages.py."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.duplicates.defaults import default_threshold
from tests.web.test_pages import Tags


def test_duplicates_page_lists_collections_and_shows_the_default_threshold(
    client: TestClient, collection: str
) -> None:
    client.post("/api/v1/collections", json={"name": "other", "embedder": "pixels"})

    response = client.get("/duplicates")

    assert response.status_code == 200
    page = Tags(response.text)
    options = [a["value"] for a in page.find("option") if a.get("value")]
    assert options == ["other", collection]  # by name
    assert "selected" in page.find("option", value="other")[0]
    default = str(default_threshold("pixels"))
    assert page.by_id("app")["data-default-threshold"] == default
    threshold = page.by_id("threshold")
    assert threshold["type"] == "number" and threshold["placeholder"] == default
    assert page.find("label", **{"for": "threshold"})
    assert f"the default for this embedder,\n    {default}" in response.text
    assert page.by_id("run-start")["type"] == "submit"
    assert [a["data-status"] for a in page.find("button", **{"class": "chip"})] == ["open", "resolved", "all"]
    assert page.find("script", src="/static/duplicates.js")
    assert client.get("/static/duplicates.js").status_code == 200


def test_duplicates_page_keeps_the_chosen_collection_and_refuses_unready_ones(
    client: TestClient, collection: str
) -> None:
    client.post("/api/v1/collections", json={"name": "digits", "embedder": "cdae"})

    chosen = Tags(client.get("/duplicates", params={"collection": collection}).text)
    unready = Tags(client.get("/duplicates", params={"collection": "digits"}).text)

    assert "selected" in chosen.find("option", value=collection)[0]
    assert "hidden" in chosen.by_id("not-ready")
    assert "disabled" in unready.find("option", value="digits")[0]
    assert "hidden" not in unready.by_id("not-ready")
