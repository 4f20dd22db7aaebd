"""The web page at ``/``: server-rendered shell, static assets, and escaping of everything from data."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.main import create_app
from app.web.pages import templates

PAYLOAD = '"><img src=x onerror=alert(1)>'
STATIC = Path(__file__).resolve().parents[2] / "app" / "web" / "static"
HTML_SINKS = (
    "innerHTML",
    "outerHTML",
    "insertAdjacentHTML",
    "document.write",
    "eval(",
    "new Function",
    "srcdoc",
    "createContextualFragment",
    "DOMParser",
    "setHTML",
)
HIT_FIELDS = {"rank", "id", "score", "label", "original_name", "image_url", "thumbnail_url"}


class Tags(HTMLParser):
    """Start tags with their attributes, and the text inside each <script>."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_data(self, data: str) -> None:
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = None

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def by_id(self, element_id: str) -> dict[str, str | None]:
        (found,) = [a for _, a in self.tags if a.get("id") == element_id]
        return found


def upload(client: TestClient, collection: str, data: bytes, *, name: str = "a.png", label: str = "3") -> int:
    response = client.post(
        f"/api/v1/collections/{collection}/images",
        files={"file": (name, data, "image/png")},
        data={"metadata": json.dumps({"label": label})},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_home_lists_collection_with_image_count_and_embedder(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    upload(client, collection, make_png(1))

    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = Tags(response.text)
    (option,) = page.find("option", value=collection)
    assert "selected" in option and "disabled" not in option
    assert option["data-ready"] == "true"
    assert option["data-embedder"] == "tiny"
    assert option["data-images"] == "1"
    assert "shapes — 1 image · tiny" in response.text
    assert "disabled" not in page.by_id("file")
    assert "hidden" in page.by_id("not-ready")
    assert page.by_id("alert")["role"] == "alert"


def test_home_without_collections_explains_how_to_create_one(client: TestClient) -> None:
    response = client.get("/")

    assert response.status_code == 200
    assert "No collections yet" in response.text
    assert "make run" in response.text
    assert "/api/v1/collections" in response.text
    assert Tags(response.text).find("select") == []


def test_unready_collection_is_shown_disabled_with_reason(client: TestClient, collection: str) -> None:
    created = client.post("/api/v1/collections", json={"name": "digits", "embedder": "cdae"})
    assert created.status_code == 201, created.text
    assert created.json()["ready"] is False

    page = Tags(client.get("/").text)
    (digits,) = page.find("option", value="digits")
    assert "disabled" in digits and digits["data-ready"] == "false"
    assert "selected" in page.find("option", value=collection)[0]  # a searchable one is preselected
    assert "no trained checkpoint yet" in client.get("/").text

    chosen = client.get("/", params={"collection": "digits"})
    page = Tags(chosen.text)
    assert "hidden" not in page.by_id("not-ready")
    assert "disabled" in page.by_id("file")
    assert "cbir train cdae --collection digits" in chosen.text


def test_k_choices_stop_at_max_k(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_k": 20}))) as client:
        client.post("/api/v1/collections", json={"name": "shapes", "embedder": "tiny"})
        page = Tags(client.get("/").text)

    assert [o["value"] for o in page.find("option") if o["value"] and o["value"].isdigit()] == ["10", "20"]
    assert "selected" in page.find("option", value="10")[0]


def test_static_script_and_stylesheet_are_served(client: TestClient) -> None:
    script = client.get("/static/app.js")
    style = client.get("/static/style.css")

    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert "image-rendering: pixelated" in style.text
    assert "auto-fill" in style.text


def test_page_loads_only_local_assets_and_has_no_inline_code(client: TestClient, collection: str) -> None:
    for html in (client.get("/").text, client.get("/", params={"collection": collection}).text):
        page = Tags(html)
        for attrs, body in page.scripts:
            assert (attrs.get("src") or "").startswith("/static/") or attrs.get("type") == "application/json"
            assert attrs.get("type") == "application/json" or body.strip() == ""
        for tag, attrs in page.tags:
            assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
            for name in ("src", "href"):
                assert not (attrs.get(name) or "").startswith(("http:", "https:", "//", "javascript:")), attrs
        assert "style=" not in html


def test_unknown_collection_parameter_is_not_reflected(client: TestClient, collection: str) -> None:
    response = client.get("/", params={"collection": PAYLOAD})

    assert response.status_code == 200
    assert PAYLOAD not in response.text
    assert "onerror" not in response.text
    assert "selected" in Tags(response.text).find("option", value=collection)[0]


def test_template_escapes_collection_data() -> None:
    # Collection names are restricted to [a-z0-9_-], so feed the template the payload directly.
    hostile = SimpleNamespace(
        name=PAYLOAD,
        embedder=PAYLOAD,
        embedder_version=PAYLOAD,
        image_count=2,
        index_size=2,
        ready=False,
        dim=PAYLOAD,
    )
    request = SimpleNamespace(base_url=f"http://testserver/{PAYLOAD}/")

    for collections in ([hostile], []):
        html = templates.get_template("index.html").render(
            request=request, collections=collections, selected=PAYLOAD, max_k=100
        )
        assert PAYLOAD not in html
        assert "<img src=x" not in html
        assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html


def test_uploaded_names_and_labels_never_reach_the_html(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    image_id = upload(client, collection, make_png(2), name=f"{PAYLOAD}.png", label=PAYLOAD)

    html = client.get("/").text
    assert PAYLOAD not in html and "onerror" not in html

    # The API hands the text back verbatim; the page must insert it as text (see the script guard).
    image = client.get(f"/api/v1/images/{image_id}").json()
    assert "<img src=x onerror=alert(1)>" in image["original_name"]  # httpx sends '"' as %22
    assert image["metadata"]["label"] == PAYLOAD


def test_script_never_parses_html_strings() -> None:
    source = (STATIC / "app.js").read_text(encoding="utf-8")

    for sink in HTML_SINKS:
        assert sink not in source, sink
    assert "textContent" in source


def test_search_responses_carry_every_field_the_page_reads(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    ids = [
        upload(client, collection, make_png(seed), name=f"{seed}.png", label=f"{seed}") for seed in (0, 1, 2)
    ]
    source = (STATIC / "app.js").read_text(encoding="utf-8")
    assert "/search?k=" in source and "/similar?k=" in source

    searched = client.post(
        f"/api/v1/collections/{collection}/search", params={"k": 10}, files={"file": ("q.png", make_png(0))}
    )
    similar = client.get(f"/api/v1/collections/{collection}/images/{ids[0]}/similar", params={"k": 10})

    for response in (searched, similar):
        assert response.status_code == 200, response.text
        body = response.json()
        assert {"collection", "k", "query_image_id", "hits", "timings_ms"} <= body.keys()
        assert set(body["timings_ms"]) >= {"search", "total"}
        for hit in body["hits"]:
            assert hit.keys() >= HIT_FIELDS
            assert hit["thumbnail_url"].startswith("/api/v1/images/")
            assert re.search(r"/api/v1/images/\d+/(file|thumbnail)", hit["image_url"])
    assert similar.json()["query_image_id"] == ids[0]
    assert ids[0] not in [hit["id"] for hit in similar.json()["hits"]]


def test_problem_details_carry_the_detail_the_page_shows(client: TestClient, collection: str) -> None:
    response = client.get(f"/api/v1/collections/{collection}/images/999/similar", params={"k": 10})

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert {"title", "detail"} <= response.json().keys()
