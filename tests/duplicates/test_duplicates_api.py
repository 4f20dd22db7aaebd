"""Near-duplicate groups through the API: a run as a job, the groups, resolutions that outlive re-runs
and new copies that reopen a resolved group."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from fastapi.testclient import TestClient
from PIL import Image, ImageEnhance, ImageOps

from app.duplicates.defaults import default_threshold
from tests.api.helpers import assert_problem
from tests.holidays import require_holidays

API = "/api/v1"
# EfficientNet-Lite0 codes of these photos: altered copies of one photo score 0.89-0.98 with it,
# the photos of different scenes below 0.72 (and two photos of one Holidays scene up to 0.93, so
# none of those is used here).
THRESHOLD = 0.85


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def photo(name: str) -> Image.Image:
    return Image.open(require_holidays() / "jpg" / f"{name}.jpg").convert("RGB")


def upload(client: TestClient, collection: str, name: str, data: bytes) -> int:
    response = client.post(
        f"{API}/collections/{collection}/images", files={"file": (name, data, "image/jpeg")}
    )
    assert response.status_code in (200, 201), response.text
    return int(response.json()["id"])


def run(client: TestClient, collection: str, **body: object) -> dict:
    """Start a run and wait for its job; the job as it ended."""
    url = f"{API}/collections/{collection}/duplicates"
    response = client.post(url, json=body) if body else client.post(url)  # the body is optional
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["result_url"] == f"{API}/collections/{collection}/duplicates"
    deadline = time.monotonic() + 60
    while True:
        job = client.get(accepted["status_url"]).json()
        if job["state"] not in ("queued", "running"):
            assert job["state"] == "succeeded", job
            assert job["kind"] == "duplicates"
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def groups(client: TestClient, collection: str, status: str = "all") -> dict:
    response = client.get(f"{API}/collections/{collection}/duplicates", params={"status": status})
    assert response.status_code == 200, response.text
    return response.json()


def member_ids(group: dict) -> set[int]:
    return {m["id"] for m in group["members"]}


def test_groups_resolve_and_survive_a_rerun_with_a_new_copy(client: TestClient) -> None:
    original, other = photo("100000"), photo("100200")
    assert (
        client.post(f"{API}/collections", json={"name": "trip", "embedder": "efficientnet_lite0"}).status_code
        == 201
    )
    ids = {
        "a": upload(client, "trip", "a.jpg", jpeg(original)),
        "a_half": upload(client, "trip", "a_half.jpg", jpeg(original.resize((200, 266)))),
        "a_flip": upload(client, "trip", "a_flip.jpg", jpeg(ImageOps.mirror(original))),
        "a_q30": upload(client, "trip", "a_q30.jpg", jpeg(original, quality=30)),
        "b": upload(client, "trip", "b.jpg", jpeg(other)),
        "b_half": upload(
            client, "trip", "b_half.jpg", jpeg(other.resize((other.width // 2, other.height // 2)))
        ),
    }
    for name in ("100100", "100300", "100400"):  # distinct scenes
        ids[name] = upload(client, "trip", f"{name}.jpg", jpeg(photo(name)))
    family_a = {ids[k] for k in ("a", "a_half", "a_flip", "a_q30")}
    family_b = {ids["b"], ids["b_half"]}

    run(client, "trip", threshold=THRESHOLD)
    page = groups(client, "trip")
    assert page["run"]["threshold"] == THRESHOLD and page["run"]["images"] == 9
    assert page["run"]["method"] == "exact" and page["run"]["job_id"]
    assert [member_ids(g) for g in page["groups"]] == [family_a, family_b]  # largest first
    first, second = page["groups"]
    assert first["status"] == "open" and first["size"] == 4 and first["resolution"] is None
    assert all(p["score"] >= THRESHOLD and p["left"] < p["right"] for p in first["pairs"])
    member = next(m for m in first["members"] if m["id"] == ids["a"])
    assert member["original_name"] == "a.jpg"
    assert member["thumbnail_url"] == f"{API}/images/{ids['a']}/thumbnail"
    assert client.get(member["thumbnail_url"]).status_code == 200

    url = f"{API}/collections/trip/duplicates"
    not_member = client.post(f"{url}/{first['id']}/resolution", json={"action": "keep", "keep": ids["b"]})
    assert_problem(not_member, 422, "not_in_group")
    kept = client.post(f"{url}/{first['id']}/resolution", json={"action": "keep", "keep": ids["a"]})
    assert kept.status_code == 200, kept.text
    assert kept.json()["status"] == "resolved"
    assert {m["id"]: m["role"] for m in kept.json()["members"]}[ids["a_flip"]] == "duplicate"
    apart = client.post(f"{url}/{second['id']}/resolution", json={"action": "not_duplicates"})
    assert apart.json()["status"] == "resolved"
    assert groups(client, "trip", "open")["groups"] == []

    ids["a_bright"] = upload(
        client, "trip", "a_bright.jpg", jpeg(ImageEnhance.Brightness(original).enhance(1.3))
    )
    run(client, "trip", threshold=THRESHOLD)
    page = groups(client, "trip")
    assert (page["open"], page["resolved"]) == (1, 1)
    reopened, still = page["groups"]
    assert member_ids(reopened) == family_a | {ids["a_bright"]}
    # a run's groups replace the last run's, under new ids: an old id finds nothing (404)
    assert not {reopened["id"], still["id"]} & {first["id"], second["id"]}
    assert client.get(f"{url}/{first['id']}").status_code == 404
    assert reopened["status"] == "open" and reopened["reopened"] is True
    assert reopened["new_members"] == [ids["a_bright"]]
    assert reopened["resolution"]["action"] == "keep" and reopened["resolution"]["keep"] == ids["a"]
    assert member_ids(still) == family_b and still["status"] == "resolved"
    assert still["resolution"]["action"] == "not_duplicates"
    assert [member_ids(g) for g in groups(client, "trip", "open")["groups"]] == [family_a | {ids["a_bright"]}]

    again = client.post(
        f"{url}/{reopened['id']}/resolution", json={"action": "keep", "keep": ids["a_bright"]}
    )
    assert again.json()["status"] == "resolved" and again.json()["new_members"] == []
    assert client.delete(f"{API}/images/{ids['a_q30']}").status_code == 204  # deleted images drop out
    run(client, "trip", threshold=THRESHOLD)
    page = groups(client, "trip")
    assert (page["open"], page["resolved"]) == (0, 2)
    assert member_ids(page["groups"][0]) == family_a - {ids["a_q30"]} | {ids["a_bright"]}
    assert page["groups"][0]["resolution"]["keep"] == ids["a_bright"]

    cleared = client.delete(f"{url}/{page['groups'][0]['id']}/resolution")
    assert cleared.json()["status"] == "open" and cleared.json()["resolution"] is None


def test_a_collection_without_a_run_has_an_empty_page(client: TestClient, collection: str) -> None:
    page = groups(client, collection, "open")
    assert page["run"] is None and page["groups"] == [] and page["total"] == 0


def test_bad_requests_are_problems(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    url = f"{API}/collections/{collection}/duplicates"
    assert_problem(client.post(f"{API}/collections/missing/duplicates", json={}), 404)
    assert_problem(client.get(f"{API}/collections/missing/duplicates"), 404)
    for threshold in (1.5, 0, -0.2, "high"):
        assert_problem(client.post(url, json={"threshold": threshold}), 422)
    assert_problem(client.get(url, params={"status": "closed"}), 422)
    assert_problem(client.get(url, params={"per_page": 0}), 422)
    assert_problem(client.post(f"{url}/1/resolution", json={"action": "not_duplicates"}), 404)
    assert_problem(client.get(f"{url}/1"), 404)
    assert_problem(client.post(f"{url}/1/resolution", json={"action": "keep"}), 422)
    assert_problem(client.post(f"{url}/1/resolution", json={"action": "not_duplicates", "keep": 3}), 422)
    assert_problem(client.post(f"{url}/1/resolution", json={"action": "merge"}), 422)
    assert_problem(client.post(f"{url}/99999999999/resolution", json={"action": "not_duplicates"}), 422)


def test_a_run_takes_the_default_threshold_and_may_find_nothing(
    client: TestClient, collection: str, make_png: Callable[..., bytes]
) -> None:
    for seed in range(5):
        upload(client, collection, f"{seed}.png", make_png(seed))
    job = run(client, collection)
    assert job["params"]["threshold"] == default_threshold("tiny")
    assert groups(client, collection)["run"]["threshold"] == default_threshold("tiny")

    run(client, collection, threshold=0.9999)
    page = groups(client, collection)
    assert page["run"]["images"] == 5 and page["run"]["pairs"] == 0 and page["groups"] == []
