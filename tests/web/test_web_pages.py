"""The pages besides search: each is a server-rendered shell sharing one navigation; data comes
from the JSON API, so nothing a user uploaded is in the HTML, and no page has inline code."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.main import create_app
from app.web.pages import NAV, templates
from tests.web.test_pages import HTML_SINKS, PAYLOAD, STATIC, Tags

PAGES = ["/", "/browse", "/import", "/evaluate", "/map", "/duplicates"]


def upload(client: TestClient, collection: str, data: bytes, *, name: str, metadata: dict) -> int:
    response = client.post(
        f"/api/v1/collections/{collection}/images",
        files={"file": (name, data, "image/png")},
        data={"metadata": json.dumps(metadata)},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_with_the_navigation_marking_itself(
    client: TestClient, collection: str, path: str
) -> None:
    response = client.get(path, params={"collection": collection})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = Tags(response.text)
    targets = {href for _, href, _ in NAV}
    links = [a for tag, a in page.tags if tag == "a" and (a.get("href") or "").split("?")[0] in targets]
    assert [a["href"] for a in links if a.get("class") != "brand"] == [
        f"{href}?collection={collection}" for _, href, _ in NAV
    ]
    current = [a for a in links if a.get("aria-current") == "page"]
    assert len(current) == 1 and current[0]["href"].split("?")[0] == path
    assert page.by_id("alert")["role"] == "alert"
    assert page.find("html", lang="en")
    assert len(page.find("h1")) == 1


@pytest.mark.parametrize("path", PAGES)
def test_pages_load_only_local_assets_and_have_no_inline_code(
    client: TestClient, collection: str, path: str
) -> None:
    html = client.get(path, params={"collection": collection}).text
    page = Tags(html)

    scripts = [attrs.get("src") for attrs, _ in page.scripts]
    assert scripts[0] == "/static/common.js" and len(scripts) == 2
    for attrs, body in page.scripts:
        assert (attrs.get("src") or "").startswith("/static/") and body.strip() == ""
        assert "defer" in attrs
    for tag, attrs in page.tags:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        for name in ("src", "href"):
            assert not (attrs.get(name) or "").startswith(("http:", "https:", "//", "javascript:")), attrs
    assert "style=" not in html
    for src in scripts:
        assert client.get(src).status_code == 200


@pytest.mark.parametrize("path", PAGES)
def test_pages_without_collections_still_render(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 200
    if path == "/import":
        assert "New collection" in response.text
    else:
        assert "No collections yet" in response.text


@pytest.mark.parametrize("path", PAGES)
def test_unknown_collection_parameter_is_not_reflected(
    client: TestClient, collection: str, path: str
) -> None:
    response = client.get(path, params={"collection": PAYLOAD})

    assert response.status_code == 200
    assert PAYLOAD not in response.text and "onerror" not in response.text
    assert "selected" in Tags(response.text).find("option", value=collection)[0]


@pytest.mark.parametrize("path", PAGES)
def test_uploaded_names_and_metadata_never_reach_the_html(
    client: TestClient, collection: str, make_png: Callable[..., bytes], path: str
) -> None:
    upload(
        client,
        collection,
        make_png(3),
        name=f"{PAYLOAD}.png",
        metadata={"label": "<script>alert(1)</script>", "note": "<b>x</b>"},
    )

    html = client.get(path, params={"collection": collection}).text

    assert "<script>alert(1)" not in html and "<b>x</b>" not in html and "onerror" not in html


def test_unready_collections_can_be_browsed_and_imported_into_but_not_mapped(
    client: TestClient, collection: str
) -> None:
    client.post("/api/v1/collections", json={"name": "digits", "embedder": "cdae"})

    for path in ("/browse", "/import"):
        (option,) = Tags(client.get(path).text).find("option", value="digits")
        assert "disabled" not in option
    for path in ("/evaluate", "/map"):
        page = Tags(client.get(path, params={"collection": "digits"}).text)
        assert "disabled" in page.find("option", value="digits")[0]
        assert "hidden" not in page.by_id("not-ready")


def test_browse_preselects_the_first_collection_even_when_unready(client: TestClient) -> None:
    client.post("/api/v1/collections", json={"name": "digits", "embedder": "cdae"})

    assert "selected" in Tags(client.get("/browse").text).find("option", value="digits")[0]


def test_import_page_offers_every_embedder_and_dataset(client: TestClient, collection: str) -> None:
    page = Tags(client.get("/import").text)

    values = {attrs.get("value") for tag, attrs in page.tags if tag == "option"}
    assert {"cdae", "pixels", "tiny", "mnist:train", "mnist:test", collection, ""} <= values
    assert "CBIR_IMPORT_ROOTS" in client.get("/import").text  # says how to turn server folders on
    assert 'value="folder"' not in client.get("/import").text


def test_import_page_offers_server_folders_under_the_roots(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    with TestClient(create_app(settings.model_copy(update={"import_roots": str(root)}))) as client:
        html = client.get("/import").text
    assert 'value="folder"' in html and f'value="{root}"' in html


def test_templates_escape_collection_data() -> None:
    hostile = SimpleNamespace(
        name=PAYLOAD,
        embedder=PAYLOAD,
        embedder_version=PAYLOAD,
        image_count=2,
        index_size=2,
        ready=True,
        dim=3,
    )
    request = SimpleNamespace(base_url=f"http://testserver/{PAYLOAD}/")
    context = {
        "request": request,
        "collections": [hostile],
        "selected": PAYLOAD,
        "max_k": 100,
        "nav": NAV,
        "embedders": [SimpleNamespace(name=PAYLOAD, description=PAYLOAD, trainable=True)],
        "default_embedder": PAYLOAD,
        "datasets": {PAYLOAD: (PAYLOAD,)},
        "methods": ["pca"],
    }
    for name in ("browse.html", "import.html", "evaluate.html", "map.html"):
        html = templates.get_template(name).render(**context, page=name)
        assert PAYLOAD not in html and "<img src=x" not in html, name


def test_no_script_parses_html_strings() -> None:
    scripts = sorted(STATIC.glob("*.js"))
    assert {p.name for p in scripts} >= {
        "common.js",
        "app.js",
        "browse.js",
        "import.js",
        "evaluate.js",
        "map.js",
    }
    for path in scripts:
        source = path.read_text(encoding="utf-8")
        for sink in HTML_SINKS:
            assert sink not in source, (path.name, sink)
        assert 'setAttribute("style"' not in source and ".cssText" not in source, path.name


def test_favicon_is_served(client: TestClient) -> None:
    response = client.get("/static/favicon.svg")

    assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg")
