"""Finding 12, its limit: a scalar parameter given twice is refused on the API only. A web page
given ``?collection=a&collection=b`` (a link built by appending, a bookmark edited by hand) is
rendered with the first value, as a page should be, never answered with a JSON 422."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import assert_problem
from tests.redteam.user_text import API
from tests.web.test_pages import Tags


@pytest.mark.parametrize("page", ["/", "/browse", "/import", "/evaluate", "/map"])
def test_a_page_given_a_parameter_twice_renders_with_the_first_value(
    client: TestClient, collection: str, page: str
) -> None:
    other = client.post(f"{API}/collections", json={"name": "other", "embedder": "tiny"})
    assert other.status_code == 201, other.text
    for first, second in ((collection, "other"), ("other", collection)):
        response = client.get(page, params=[("collection", first), ("collection", second)])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        options = Tags(response.text).find("option", value=first)
        assert options and "selected" in options[0], (page, first)


def test_the_api_still_refuses_a_parameter_given_twice(client: TestClient, collection: str) -> None:
    response = client.get(f"{API}/collections/{collection}/images?limit=1&limit=2")
    assert "'limit'" in assert_problem(response, 422, "invalid_request")["detail"]
