"""Contract of every registered embedder: shape, dtype, unit norm, determinism, metadata.

Pretrained CNNs run on random-init checkpoints written under torchvision's file names
(``cnn_weights``); never on a download.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cdae, head, lenet, registry
from models.base import Embedder
from tests.conftest import BIG_CNNS


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, cnn_weights: Callable[[str], Path]
) -> dict[str, Path]:
    """One small trained checkpoint per trainable embedder (cnn_head: on efficientnet_lite0's
    packaged weights, the base its factory finds on its own)."""
    folder = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
    config = cdae.CDAEConfig.preset("tutorial")
    result = cdae.train_cdae(images, config=config, epochs=1, device=torch.device("cpu"))
    cdae.save_checkpoint(
        folder / "cdae.pt", result=result, config=config, dataset={"name": "random", "images": 64}
    )
    labels = np.arange(64) % 4
    trained = lenet.train_lenet(
        images, labels, classes=list("abcd"), config=lenet.LeNetConfig(), epochs=1, device=torch.device("cpu")
    )
    trained.save(folder / "lenet5.pt", dataset={"name": "random", "images": 64})
    base_spec = "efficientnet_lite0:input=whole,sizes=128"
    base = registry.create(base_spec, weights_dir=cnn_weights("efficientnet_lite0"), download=False)
    codes = rng.standard_normal((64, base.dim)).astype(np.float32)
    fitted = head.train_head(
        codes,
        labels,
        classes=list("abcd"),
        base_spec=base_spec,
        base_version=base.version,
        config=head.HeadConfig(dim=16),
        epochs=1,
    )
    fitted.save(folder / "cnn_head.pt", dataset={"name": "random", "images": 64})
    return {"cdae": folder / "cdae.pt", "lenet5": folder / "lenet5.pt", "cnn_head": folder / "cnn_head.pt"}


def build(name: str, checkpoints: dict[str, Path], cnn_weights: Callable[[str], Path]) -> Embedder:
    spec = registry.get_spec(name)
    if spec.pretrained:
        return registry.create(name, weights_dir=cnn_weights(name), download=False)
    return registry.create(name, checkpoint=checkpoints[name] if spec.trainable else None)


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8), mode="RGB"),
        Image.new("L", (28, 28), 0),  # all black: must not become NaN
    ]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG_CNNS else n for n in registry.names()]
)
def test_embedder_contract(
    name: str, checkpoints: dict[str, Path], cnn_weights: Callable[[str], Path]
) -> None:
    embedder = build(name, checkpoints, cnn_weights)
    vectors = embedder.embed(sample_images())
    assert vectors.shape == (3, embedder.dim)
    assert vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms[:2], 1.0, atol=1e-5)
    assert norms[2] == pytest.approx(1.0, abs=1e-5) or norms[2] == 0.0
    # Same image, same vector: deterministic in eval mode, batch or single.
    again = embedder.embed(sample_images()[:1])
    np.testing.assert_allclose(again[0], vectors[0], atol=1e-5)
    assert embedder.version and embedder.name == name
    # The version is a function of the weights and options: built again, it is the same.
    assert build(name, checkpoints, cnn_weights).version == embedder.version


def test_registry_refuses_duplicate_names() -> None:
    spec = registry.get_spec("pixels")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec)


def test_importing_the_registry_alone_registers_every_builtin_model() -> None:
    # A fresh interpreter that imports nothing but the registries: the models package registers
    # its concrete models itself, the registries import none of them.
    code = (
        "from models.registry import names; from models.classifier import arch_names; "
        "print(' '.join(names())); print(' '.join(arch_names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    embedders, archs = (line.split() for line in out.splitlines())
    builtin = {"pixels", "tiny", "cdae", "lenet5", "cnn_head", "efficientnet_lite0", "resnet18"}
    assert builtin <= set(embedders)
    assert archs == ["head", "lenet5"]


def test_unknown_embedder_lists_the_known_ones() -> None:
    with pytest.raises(registry.UnknownEmbedder, match="pixels"):
        registry.get_spec("resnet9000")


def test_trainable_embedder_without_checkpoint_is_refused() -> None:
    with pytest.raises(registry.CheckpointRequired):
        registry.create("cdae")
