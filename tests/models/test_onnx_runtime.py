"""ONNX Runtime for CNN codes on the CPU: same vectors and version as torch, exported once and cached,
torch again (with a warning) whenever the export, the cache or the check fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cnn, onnx_runtime, registry, runtime_choice

pytestmark = pytest.mark.skipif(not onnx_runtime.available(), reason="onnxruntime or onnx not installed")


def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = [(320, 240), (240, 320), (500, 200)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def create(spec: str, weights_dir: Path, **kwargs: object) -> cnn.CNNEmbedder:
    embedder = registry.create(spec, weights_dir=weights_dir, download=False, **kwargs)  # type: ignore[arg-type]
    assert isinstance(embedder, cnn.CNNEmbedder)
    return embedder


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the exports ``onnx_runtime.prepare`` runs."""
    done: list[str] = []
    real = onnx_runtime.export

    def counting(*args: object, **kwargs: object) -> bytes:
        done.append("export")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_runtime, "export", counting)
    return done


@pytest.mark.parametrize("spec", ["resnet18", "resnet18:input=whole,sizes=224+288,pooling=gem"])
def test_onnx_codes_equal_torch_codes_and_keep_the_version(
    spec: str, cnn_weights: Callable[[str], Path], tmp_path: Path
) -> None:
    torch_embedder = create(spec, cnn_weights("resnet18"))
    onnx_embedder = create(spec, cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path)
    expected, got = torch_embedder.embed(images()), onnx_embedder.embed(images())
    assert onnx_embedder.active_runtime == "onnx" and torch_embedder.active_runtime == "torch"
    assert onnx_embedder.version == torch_embedder.version
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=onnx_runtime.MAX_DIFF)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_onnx_export_is_cached_by_version_and_reused(
    cnn_weights: Callable[[str], Path], tmp_path: Path, exports: list[str]
) -> None:
    first = create("resnet18", cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path)
    first.load()
    cached = tmp_path / onnx_runtime.cache_name(first.version, None)
    assert cached.is_file() and exports == ["export"]
    assert list(tmp_path.iterdir()) == [cached]  # no temporary file left behind
    second = create("resnet18", cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path)
    assert second.active_runtime == "onnx" and exports == ["export"]  # read, not exported again
    np.testing.assert_allclose(second.embed(images()), first.embed(images()), atol=1e-6)
    # another option, another version, another file
    create("resnet18:pooling=max", cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path).load()
    assert exports == ["export", "export"] and len(list(tmp_path.iterdir())) == 2


def test_a_corrupt_cached_export_is_replaced(
    cnn_weights: Callable[[str], Path], tmp_path: Path, exports: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    version = create("resnet18", cnn_weights("resnet18")).version
    cached = tmp_path / onnx_runtime.cache_name(version, None)
    cached.write_bytes(b"not an onnx model")
    with caplog.at_level(logging.WARNING, logger="models.onnx_runtime"):
        embedder = create("resnet18", cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path)
        assert embedder.active_runtime == "onnx"
    assert "unusable" in caplog.text and exports == ["export"]
    assert cached.stat().st_size > 1_000_000


def test_a_failed_export_falls_back_to_torch_with_a_warning(
    cnn_weights: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(onnx_runtime, "export", broken)
    with caplog.at_level(logging.WARNING, logger="models.onnx_runtime"):
        embedder = create("resnet18", cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path)
        vectors = embedder.embed(images())
    assert embedder.active_runtime == "torch"
    assert "running in torch" in caplog.text and "operator foo" in caplog.text
    np.testing.assert_allclose(
        vectors, create("resnet18", cnn_weights("resnet18")).embed(images()), atol=1e-6
    )
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_disagrees_with_torch_is_not_used(
    cnn_weights: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(onnx_runtime, "MAX_DIFF", -1.0)  # nothing can pass
    with caplog.at_level(logging.WARNING, logger="models.onnx_runtime"):
        embedder = create("resnet18", cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path)
        assert embedder.active_runtime == "torch"
    assert "differs from torch" in caplog.text
    assert list(tmp_path.iterdir()) == []  # a failed export is not cached


@pytest.mark.slow
def test_fully_connected_layers_run_other_shapes_in_torch(
    cnn_weights: Callable[[str], Path], tmp_path: Path
) -> None:
    # fc6 follows an adaptive pooling that the exporter can only trace at one size
    spec = "alexnet:input=whole"
    onnx_embedder = create(spec, cnn_weights("alexnet"), runtime="onnx", onnx_dir=tmp_path)
    assert onnx_embedder.active_runtime == "onnx"
    assert onnx_embedder._onnx is not None and onnx_embedder._onnx.size == (224, 224)
    expected = create(spec, cnn_weights("alexnet")).embed(images())
    np.testing.assert_allclose(onnx_embedder.embed(images()), expected, atol=onnx_runtime.MAX_DIFF)


def test_auto_runtime_times_both_once_and_caches_the_choice(
    cnn_weights: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed: list[tuple[int, ...]] = []
    real = runtime_choice.measure

    def counting(**kwargs: object) -> runtime_choice.Choice:
        choice = real(**kwargs)  # type: ignore[arg-type]
        assert choice.shape is not None
        timed.append(choice.shape)
        return choice

    monkeypatch.setattr(runtime_choice, "measure", counting)
    spec = "resnet18:input=whole,sizes=224,pooling=rmac"
    embedder = create(spec, cnn_weights("resnet18"), runtime="auto", onnx_dir=tmp_path)
    info = embedder.describe()["runtime_choice"]
    assert isinstance(info, dict) and info["state"] == "chosen" and info["reason"] == "measured"
    assert timed == [(runtime_choice.BATCH, 3, 224, 299)]  # a 4:3 photo at the embedder's size
    faster = "onnx" if float(info["onnx_img_s"]) > float(info["torch_img_s"]) else "torch"  # type: ignore[arg-type]
    assert embedder.active_runtime == info["active"] == faster
    choice_file = runtime_choice.choice_path(
        tmp_path, version=embedder.version, device="cpu", threads=torch.get_num_threads()
    )
    assert choice_file.is_file()
    again = create(spec, cnn_weights("resnet18"), runtime="auto", onnx_dir=tmp_path)
    assert again.active_runtime == faster and len(timed) == 1  # read, not timed again
    assert (again.runtime_info() or {})["reason"] == "cached"


@pytest.mark.parametrize(("faster", "slower"), [("onnx", "torch"), ("torch", "onnx")])
def test_auto_runtime_uses_the_faster_one(
    faster: str,
    slower: str,
    cnn_weights: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def rigged(**kwargs: object) -> runtime_choice.Choice:
        rates = {f"{faster}_img_s": 20.0, f"{slower}_img_s": 10.0}
        return runtime_choice.Choice(faster, "measured", shape=(1, 3, 224, 224), **rates)

    monkeypatch.setattr(runtime_choice, "measure", rigged)
    embedder = create("resnet18", cnn_weights("resnet18"), runtime="auto", onnx_dir=tmp_path)
    assert embedder.active_runtime == faster


def test_a_deferred_choice_serves_torch_until_prepared(
    cnn_weights: Callable[[str], Path], tmp_path: Path
) -> None:
    embedder = create(
        "resnet18", cnn_weights("resnet18"), runtime="onnx", onnx_dir=tmp_path, defer_runtime=True
    )
    before = embedder.embed(images())
    assert embedder.runtime_pending and embedder.active_runtime == "torch"
    assert (embedder.runtime_info() or {})["state"] == "pending" and list(tmp_path.iterdir()) == []
    embedder.prepare_runtime()
    assert not embedder.runtime_pending and embedder.active_runtime == "onnx"
    np.testing.assert_allclose(embedder.embed(images()), before, atol=onnx_runtime.MAX_DIFF)


@pytest.mark.parametrize("spec", ["efficientnet_lite0", "resnet18:input=crop,pooling=gem"])
def test_same_image_same_vector_on_torch_and_onnx(
    spec: str, cnn_weights: Callable[[str], Path], tmp_path: Path
) -> None:
    # efficientnet_lite0's own default: whole images at 288 px, R-MAC pooled after the trunk
    name = spec.split(":")[0]
    torch_embedder = create(spec, cnn_weights(name))
    onnx_embedder = create(spec, cnn_weights(name), runtime="onnx", onnx_dir=tmp_path)
    assert onnx_embedder.active_runtime == "onnx" and onnx_embedder.version == torch_embedder.version
    expected, got = torch_embedder.embed(images()), onnx_embedder.embed(images())
    cosines = (expected * got).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_unknown_runtime_is_refused(cnn_weights: Callable[[str], Path]) -> None:
    with pytest.raises(registry.InvalidEmbedderOptions, match="runtime must be one of torch, onnx, auto"):
        create("resnet18", cnn_weights("resnet18"), runtime="tensorrt")
