"""LeNet-5: layer sizes, training on real digits, checkpoints and the registered ``lenet5`` embedder."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app.ingest.sources.datasets import load_mnist
from models import registry
from models.classifier import arch_names, get_arch
from models.lenet import (
    CosineClassifier,
    LeNet5,
    LeNetConfig,
    LeNetEmbedder,
    TrainResult,
    load_checkpoint,
    prepare_image,
    train_lenet,
)
from tests.conftest import DATASETS_DIR

CPU = torch.device("cpu")
CLASSES = [str(d) for d in range(10)]
DATASET = {"name": "mnist", "split": "train", "images": 500}


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The first 500 real MNIST training digits and their labels (int64)."""
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = load_mnist("train", datasets_dir=DATASETS_DIR, download_dir=tmp)
    return np.array(images[:500]), labels[:500].astype(np.int64)


@pytest.fixture(scope="module")
def small_config() -> LeNetConfig:
    """The default recipe (batch norm, cosine head with margin, augmentation) at test size."""
    return LeNetConfig.from_dict({**LeNetConfig.preset("default").to_dict(), "batch_size": 64})


@pytest.fixture(scope="module")
def trained(mnist, small_config: LeNetConfig) -> TrainResult:
    images, labels = mnist
    return train_lenet(images, labels, classes=CLASSES, config=small_config, epochs=3, device=CPU, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, trained: TrainResult) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "lenet5.pt"
    trained.save(path, dataset=DATASET)
    return path


@pytest.mark.parametrize("preset", ["plain", "default"])
def test_layers_have_lenet5_sizes(preset: str) -> None:
    model = LeNet5(LeNetConfig.preset(preset), num_classes=10).eval()
    shapes = {name: tuple(t.shape) for name, t in model.layer_outputs(torch.rand(3, 1, 28, 28)).items()}
    assert shapes == {
        "input": (3, 1, 32, 32),  # 28x28 padded by 2
        "C1": (3, 6, 28, 28),
        "S2": (3, 6, 14, 14),
        "C3": (3, 16, 10, 10),
        "S4": (3, 16, 5, 5),
        "C5": (3, 120),
        "F6": (3, 84),
        "output": (3, 10),
    }
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)),
        (6, 16, (5, 5)),
        (16, 120, (5, 5)),
    ]
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model.features(x), model.layer_outputs(x)["F6"])
    torch.testing.assert_close(model(x), model.layer_outputs(x)["output"])


def test_output_layer_has_one_unit_per_class() -> None:
    assert LeNet5(LeNetConfig(), num_classes=3)(torch.rand(2, 1, 28, 28)).shape == (2, 3)


def test_config_round_trips_and_rejects_unknown_keys_and_wrong_input_size() -> None:
    config = LeNetConfig.preset("default")
    assert LeNetConfig.from_dict(config.to_dict()) == config
    assert LeNetConfig.preset("plain") == LeNetConfig()
    with pytest.raises(ValueError, match="unknown LeNet-5 config keys"):
        LeNetConfig.from_dict({"width": 2})
    with pytest.raises(ValueError, match="unknown LeNet-5 preset"):
        LeNetConfig.preset("huge")
    with pytest.raises(ValueError, match="32x32"):
        LeNet5(LeNetConfig(pad=0), num_classes=10)


def test_cosine_head_subtracts_the_margin_from_the_true_class_only_in_training() -> None:
    head = CosineClassifier(4, 3, scale=10.0, margin=0.25)
    features = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    plain, with_margin = head(features), head(features, labels)
    assert plain.abs().max() <= 10.0 + 1e-5  # s * cos
    diff = plain - with_margin
    torch.testing.assert_close(diff, 2.5 * F.one_hot(labels, 3).float())


def test_training_on_real_digits_learns_and_reports_per_epoch_metrics(trained: TrainResult, mnist) -> None:
    images, labels = mnist
    assert len(trained.losses) == len(trained.train_accuracy) == len(trained.epoch_seconds) == 3
    assert trained.losses[-1] < trained.losses[0]
    assert trained.train_accuracy[-1] > trained.train_accuracy[0]
    assert not trained.model.training
    with torch.inference_mode():
        predicted = trained.model(torch.from_numpy(images).unsqueeze(1).float() / 255).argmax(1)
    assert (predicted.numpy() == labels).mean() > 0.8  # chance is 0.1; measured 0.90
    assert trained.classes == CLASSES
    # Standardisation was fitted on the (padded) training pixels and travels with the weights.
    assert 0.05 < float(trained.model.pixel_mean) < 0.2 and 0.2 < float(trained.model.pixel_std) < 0.4


def test_train_reports_progress_per_step(mnist) -> None:
    images, labels = mnist
    calls: list[tuple[int, int, int, float]] = []
    config = LeNetConfig(batch_size=100)
    train_lenet(
        images[:200],
        labels[:200],
        classes=CLASSES,
        config=config,
        epochs=2,
        device=CPU,
        progress=lambda *a: calls.append(a),
    )
    assert [c[:3] for c in calls] == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]


def test_a_last_batch_of_one_image_is_left_out(mnist, small_config: LeNetConfig) -> None:
    images, labels = mnist
    calls: list[tuple[int, int, int, float]] = []
    config = LeNetConfig.from_dict({**small_config.to_dict(), "batch_size": 128})
    train_lenet(
        images[:129],
        labels[:129],
        classes=CLASSES,
        config=config,
        epochs=1,
        device=CPU,
        progress=lambda *a: calls.append(a),
    )
    assert [c[:3] for c in calls] == [(1, 1, 1)]


def test_train_is_deterministic_given_the_seed(
    mnist, small_config: LeNetConfig, trained: TrainResult
) -> None:
    images, labels = mnist
    again = train_lenet(images, labels, classes=CLASSES, config=small_config, epochs=3, device=CPU, seed=0)
    assert again.losses == trained.losses
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_train_rejects_bad_images_and_labels(mnist) -> None:
    images, labels = mnist
    config = LeNetConfig()
    with pytest.raises(ValueError, match="uint8"):
        train_lenet(images.astype(np.float32), labels, classes=CLASSES, config=config, device=CPU)
    with pytest.raises(ValueError, match="uint8"):
        train_lenet(images[:, :20, :20], labels, classes=CLASSES, config=config, device=CPU)
    with pytest.raises(ValueError, match="one per image"):
        train_lenet(images, labels[:10], classes=CLASSES, config=config, device=CPU)
    with pytest.raises(ValueError, match="10 classes"):
        train_lenet(images, labels + 1, classes=CLASSES, config=config, device=CPU)
    with pytest.raises(ValueError, match="at least 2"):
        train_lenet(images, labels * 0, classes=["0"], config=config, device=CPU)


def test_checkpoint_is_self_describing_and_hashed(tmp_path: Path, trained: TrainResult) -> None:
    path = tmp_path / "lenet5.pt"
    sha = trained.save(path, dataset=DATASET)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["lenet5.pt"]  # no temp file left behind
    model, meta = load_checkpoint(path)
    assert meta["config"] == trained.config
    assert meta["classes"] == CLASSES
    assert meta["epoch_losses"] == trained.losses
    assert meta["epoch_train_accuracy"] == trained.train_accuracy
    assert meta["dataset"] == DATASET
    assert meta["sha256"] == sha and meta["arch"] == "lenet5"
    assert meta["format_version"] == 1 and meta["created_at"]
    assert not model.training


def test_checkpoint_round_trip_gives_identical_embeddings(
    checkpoint: Path, trained: TrainResult, mnist
) -> None:
    x = torch.from_numpy(mnist[0][:32]).float().div(255).unsqueeze(1)
    with torch.inference_mode():
        expected = F.normalize(trained.model.features(x), dim=1)
    first = registry.create("lenet5", checkpoint=checkpoint).embed_batch(x)
    second = LeNetEmbedder(checkpoint=checkpoint).embed_batch(x)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # torn write
        lambda data: b"not a checkpoint" * 100,  # foreign bytes
        lambda data: data[:100] + bytes(200) + data[300:],  # bit rot inside the archive
    ],
    ids=["truncated", "foreign", "zeroed"],
)
def test_corrupted_checkpoint_raises_value_error(tmp_path: Path, checkpoint: Path, damage) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(damage(checkpoint.read_bytes()))
    with pytest.raises(ValueError):
        load_checkpoint(bad)
    with pytest.raises(ValueError):
        registry.create("lenet5", checkpoint=bad)


def test_other_checkpoints_are_refused(tmp_path: Path, checkpoint: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, other)
    with pytest.raises(ValueError, match="not a LeNet-5 checkpoint"):
        load_checkpoint(other)
    payload = torch.load(checkpoint, weights_only=True)
    payload["classes"] = ["a", "b"]  # 10 output units in the weights
    torch.save(payload, other)
    with pytest.raises(ValueError, match="inconsistent LeNet-5 checkpoint"):
        load_checkpoint(other)


def test_lenet5_needs_a_checkpoint() -> None:
    assert registry.get_spec("lenet5").trainable
    with pytest.raises(registry.CheckpointRequired):
        registry.create("lenet5")


def test_registered_lenet5_meets_the_embedder_contract(checkpoint: Path, mnist) -> None:
    embedder = registry.create("lenet5", checkpoint=checkpoint)
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)),  # RGB, odd size
        Image.fromarray(mnist[0][0]),  # a digit at the training size
        Image.new("L", (28, 28)),  # all black
    ]
    vectors = embedder.embed(pictures)
    assert vectors.shape == (3, 84) and embedder.dim == 84
    assert vectors.dtype == np.float32
    assert not np.isnan(vectors).any()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors, embedder.embed(pictures))  # deterministic
    np.testing.assert_allclose(embedder.embed(pictures[1:2])[0], vectors[1], atol=1e-5)  # batch or single
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert embedder.version == "lenet5-" + sha[:12]
    assert embedder.describe()["classes"] == CLASSES


def test_same_digit_class_is_closer_than_another(checkpoint: Path, mnist) -> None:
    images, labels = mnist
    vectors = registry.create("lenet5", checkpoint=checkpoint).embed([Image.fromarray(x) for x in images])
    similarity = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean() + 0.3


def test_preprocess_matches_the_training_pixels(checkpoint: Path, mnist) -> None:
    embedder = LeNetEmbedder(checkpoint=checkpoint)
    pixels = mnist[0][3]
    tensor = embedder.preprocess(Image.fromarray(pixels).convert("RGB"))
    assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor[0].numpy(), pixels.astype(np.float32) / 255)
    big = prepare_image(Image.new("RGB", (56, 56), "white"), config=embedder.config)
    assert big.shape == (28, 28) and big.dtype == np.uint8 and (big == 255).all()


def test_lenet5_is_a_registered_classifier_arch() -> None:
    assert "lenet5" in arch_names()
    arch = get_arch("lenet5")
    assert arch.embedder == "lenet5" and registry.get_spec(arch.embedder).trainable
    assert arch.prepare(Image.new("L", (64, 64))).shape == (28, 28)
    with pytest.raises(ValueError, match="unknown classifier arch"):
        get_arch("resnet9000")
