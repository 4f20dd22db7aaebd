"""Collections with a pretrained CNN embedder: missing weights, CBIR_WEIGHTS_DIR, invalid options.

Weights are never downloaded here: the settings disable downloads and torch.hub's cache is an empty
temporary folder (``torch_hub_dir``), so "missing" means missing on every machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.core.settings import Settings
from app.main import create_app
from models import registry
from tests.api.helpers import assert_problem

API = "/api/v1"


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, torch_hub_dir: Path) -> Settings:
    """The shared test settings, offline: an empty weights folder and no downloads."""
    empty = tmp_path / "weights"
    empty.mkdir()
    return settings.model_copy(update={"weights_dir": empty, "weights_download": False})


@pytest.fixture
def client_with_weights(
    settings: Settings, cnn_weights: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """A service whose CBIR_WEIGHTS_DIR (read from the environment) holds a resnet18 checkpoint."""
    monkeypatch.setenv("CBIR_WEIGHTS_DIR", str(cnn_weights("resnet18")))
    from_env = Settings(**settings.model_dump(exclude={"weights_dir"}))
    assert from_env.weights_dir == cnn_weights("resnet18")
    with TestClient(create_app(from_env), raise_server_exceptions=False) as test_client:
        yield test_client


def create(client: TestClient, embedder: str, name: str = "photos") -> httpx.Response:
    return client.post(f"{API}/collections", json={"name": name, "embedder": embedder})


def test_missing_weights_are_a_problem_naming_the_file_and_folder(client: TestClient, settings: Settings):
    body = assert_problem(create(client, "resnet18"), 422, "weights_missing")
    assert "resnet18-f37072fd.pth" in body["detail"]
    assert str(settings.weights_dir) in body["detail"]
    assert "CBIR_WEIGHTS_DIR" in body["detail"]
    assert client.get(f"{API}/collections/photos").status_code == 404  # nothing half-created


def test_weights_put_in_place_later_are_found_without_a_restart(
    client: TestClient, settings: Settings, cnn_weights: Callable[[str], Path]
):
    assert_problem(create(client, "resnet18"), 422, "weights_missing")
    assert settings.weights_dir is not None
    (settings.weights_dir / "resnet18-f37072fd.pth").symlink_to(
        cnn_weights("resnet18") / "resnet18-f37072fd.pth"
    )
    assert create(client, "resnet18").status_code == 201


def test_resnet18_collection_with_weights_uploads_and_searches(
    client_with_weights: TestClient, make_png: Callable[..., bytes]
):
    client = client_with_weights
    response = create(client, "resnet18:pooling=gem")
    assert response.status_code == 201, response.text
    described = client.get(f"{API}/collections/photos").json()
    assert described["embedder"] == "resnet18:pooling=gem"
    assert described["embedder_version"].startswith("resnet18-")
    ids = {}
    for seed in range(4):
        data = make_png(seed, size=(96, 64), mode="RGB")
        uploaded = client.post(
            f"{API}/collections/photos/images", files={"file": ("a.png", data, "image/png")}
        )
        assert uploaded.status_code == 201, uploaded.text
        ids[uploaded.json()["id"]] = data
    for image_id, data in ids.items():
        found = client.post(
            f"{API}/collections/photos/search", params={"k": 2}, files={"file": ("q.png", data)}
        )
        assert found.status_code == 200, found.text
        hits = found.json()["hits"]
        assert hits[0]["id"] == image_id and hits[0]["score"] >= 0.999


@pytest.mark.parametrize(
    ("embedder", "fragment"),
    [
        ("resnet18:layer=nope", "layer must be one of layer4, layer3"),
        ("resnet18:pooling=foo", "pooling must be one of avg, max, gem"),
        ("resnet18:sizes=224", "sizes applies to input=whole only"),
        ("resnet18:p=100", "p must be between 1 and 16"),
    ],
)
def test_invalid_embedder_options_are_422(client: TestClient, embedder: str, fragment: str):
    body = assert_problem(create(client, embedder), 422, "invalid_embedder_options")
    assert fragment in body["detail"]


def test_cnn_runtime_setting_is_validated():
    with pytest.raises(ValidationError, match="cnn_runtime"):
        Settings(cnn_runtime="tensorrt")  # type: ignore[arg-type]


def test_onnx_runtime_setting_serves_the_same_version(
    settings: Settings, cnn_weights: Callable[[str], Path], make_png: Callable[..., bytes]
):
    onnx = settings.model_copy(update={"weights_dir": cnn_weights("resnet18"), "cnn_runtime": "onnx"})
    with TestClient(create_app(onnx), raise_server_exceptions=False) as client:
        assert create(client, "resnet18").status_code == 201
        version = client.get(f"{API}/collections/photos").json()["embedder_version"]
        data = make_png(1, size=(64, 64), mode="RGB")
        assert (
            client.post(f"{API}/collections/photos/images", files={"file": ("a.png", data)}).status_code
            == 201
        )
        found = client.post(f"{API}/collections/photos/search", files={"file": ("q.png", data)})
        assert found.json()["hits"][0]["score"] >= 0.999
        assert client.app.state.context.embedders.wait_for_runtimes(timeout=120)  # type: ignore[attr-defined]
        runtime = client.get(f"{API}/collections/photos").json()["runtime"]
        assert runtime["active"] == "onnx" and runtime["reason"] == "requested"
    assert version == registry.create("resnet18", weights_dir=cnn_weights("resnet18"), download=False).version
    assert [p.name for p in (onnx.data_dir / "onnx").iterdir()] == [f"{version}-dyn-trunk-opset17.onnx"]


def test_auto_runtime_is_the_default_chosen_in_the_background_and_reported(
    settings: Settings, cnn_weights: Callable[[str], Path], make_png: Callable[..., bytes]
):
    auto = settings.model_copy(update={"weights_dir": cnn_weights("resnet18"), "cnn_runtime": "auto"})
    assert Settings.model_fields["cnn_runtime"].default == "auto"
    with TestClient(create_app(auto), raise_server_exceptions=False) as client:
        assert create(client, "resnet18").status_code == 201
        created = client.get(f"{API}/collections/photos").json()["runtime"]  # loaded to learn its version
        assert created["requested"] == "auto" and created["state"] in {"pending", "chosen"}
        data = make_png(1, size=(64, 64), mode="RGB")
        uploaded = client.post(f"{API}/collections/photos/images", files={"file": ("a.png", data)})
        assert uploaded.status_code == 201  # computed in torch or ONNX, whichever is ready
        assert client.app.state.context.embedders.wait_for_runtimes(timeout=120)  # type: ignore[attr-defined]
        runtime = client.get(f"{API}/collections/photos").json()["runtime"]
        assert runtime["requested"] == "auto" and runtime["state"] == "chosen"
        assert runtime["reason"] == "measured" and runtime["torch_img_s"] > 0 and runtime["onnx_img_s"] > 0
        faster = "onnx" if runtime["onnx_img_s"] > runtime["torch_img_s"] else "torch"
        assert runtime["active"] == faster
        (health,) = client.get(f"{API}/health").json()["runtimes"]
        assert health["embedder"] == "resnet18" and health["active"] == faster
        found = client.post(f"{API}/collections/photos/search", files={"file": ("q.png", data)})
        assert found.json()["hits"][0]["score"] >= 0.999  # stored in one runtime, searched in the other
    names = sorted(p.name for p in (auto.data_dir / "onnx").iterdir())
    assert [n.rsplit("-", 2)[-2:] for n in names] == [["cpu", "t1.runtime.json"], ["trunk", "opset17.onnx"]]
