"""CDAE: network shapes, corruption, training, checkpoints and the registered embedder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import registry
from models.cdae import (
    CDAE,
    CDAEConfig,
    CDAEEmbedder,
    TrainResult,
    apply_whitening,
    corrupt,
    load_checkpoint,
    prepare_image,
    save_checkpoint,
    train_cdae,
)

CPU = torch.device("cpu")
DATASET = {"name": "synthetic-strokes", "images": 256}


def stroke_images(n: int, *, seed: int = 0, size: int = 28) -> np.ndarray:
    """uint8 (n, size, size): one bright bar per image at a random place and orientation."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), dtype=np.uint8)
    for image in images:
        r, c = rng.integers(4, size - 10, size=2)
        if rng.random() < 0.5:
            image[r : r + 3, c : c + 10] = 255
        else:
            image[r : r + 10, c : c + 3] = 255
    return images


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return stroke_images(256)


@pytest.fixture(scope="module")
def small_config() -> CDAEConfig:
    """The default recipe (augmentations, consistency, whitening) at test size."""
    return CDAEConfig.from_dict({**CDAEConfig.preset("default").to_dict(), "batch_size": 64, "whiten": True})


@pytest.fixture(scope="module")
def trained(images: np.ndarray, small_config: CDAEConfig) -> TrainResult:
    return train_cdae(images, config=small_config, epochs=1, device=CPU, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, trained: TrainResult) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "cdae.pt"
    save_checkpoint(path, result=trained, config=trained.model.config, dataset=DATASET)
    return path


def test_tutorial_network_has_128_d_code_and_reconstructs_in_unit_range() -> None:
    model = CDAE(CDAEConfig.preset("tutorial")).eval()
    x = torch.rand(5, 1, 28, 28)
    assert model.encode(x).shape == (5, 128)
    out = model(x)
    assert out.shape == (5, 1, 28, 28)
    assert out.min() >= 0 and out.max() <= 1


def test_linear_bottleneck_sets_code_dim_for_any_image_size() -> None:
    config = CDAEConfig(image_size=32, channels=3, code_dim=64, batch_norm=True)
    model = CDAE(config).eval()
    assert model.encode(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    assert model.code_dim == 64


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    config = CDAEConfig.preset("default")
    assert CDAEConfig.from_dict(config.to_dict()) == config
    assert CDAEConfig.preset("tutorial") == CDAEConfig()
    with pytest.raises(ValueError, match="unknown CDAE config keys"):
        CDAEConfig.from_dict({"noise": 0.1})
    with pytest.raises(ValueError, match="unknown CDAE preset"):
        CDAEConfig.preset("huge")


def test_corrupt_is_seeded_stays_in_unit_range_and_changes_the_image(
    small_config: CDAEConfig,
) -> None:
    x = torch.from_numpy(stroke_images(16)).float().div(255).unsqueeze(1)
    a = corrupt(x, config=small_config, generator=torch.Generator().manual_seed(3))
    b = corrupt(x, config=small_config, generator=torch.Generator().manual_seed(3))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.05


def test_loss_falls_on_a_small_batch_within_a_few_steps() -> None:
    torch.manual_seed(0)
    config = CDAEConfig.preset("tutorial")
    model = CDAE(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(stroke_images(64)).float().div(255).unsqueeze(1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        logits = model.decode_logits(model.encode(corrupt(x, config=config, generator=gen)))
        loss = F.binary_cross_entropy_with_logits(logits, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_train_reports_per_epoch_losses_seconds_and_progress(images: np.ndarray) -> None:
    calls: list[tuple[int, int, int, float]] = []
    config = CDAEConfig(batch_size=128, optimizer="adam", lr=3e-3)
    result = train_cdae(images, config=config, epochs=2, device=CPU, progress=lambda *a: calls.append(a))
    assert len(result.losses) == len(result.epoch_seconds) == 2
    assert result.losses[1] < result.losses[0]
    assert [c[:3] for c in calls] == [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
    assert not result.model.training
    assert result.whitening is None


def test_train_is_deterministic_given_the_seed(
    images: np.ndarray, small_config: CDAEConfig, trained: TrainResult
) -> None:
    again = train_cdae(images, config=small_config, epochs=1, device=CPU, seed=0)
    assert again.losses == trained.losses
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_train_rejects_images_of_the_wrong_size_or_dtype(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        train_cdae(images.astype(np.float32), config=CDAEConfig(), epochs=1, device=CPU)
    with pytest.raises(ValueError, match="uint8"):
        train_cdae(images[:, :20, :20], config=CDAEConfig(), epochs=1, device=CPU)
    rgb = np.repeat(images[..., None], 3, axis=3)
    with pytest.raises(ValueError, match="uint8"):
        train_cdae(rgb, config=CDAEConfig(), epochs=1, device=CPU)


def test_checkpoint_is_self_describing_and_hashed(tmp_path: Path, trained: TrainResult) -> None:
    path = tmp_path / "cdae.pt"
    sha = save_checkpoint(path, result=trained, config=trained.model.config, dataset=DATASET)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["cdae.pt"]  # no temp file left behind
    model, meta = load_checkpoint(path)
    assert meta["config"] == trained.model.config
    assert meta["losses"] == trained.losses
    assert meta["dataset"] == DATASET
    assert meta["sha256"] == sha
    assert meta["format_version"] == 1 and meta["created_at"]
    assert set(meta["whitening"]) == {"mean", "matrix"}
    assert not model.training


def test_checkpoint_round_trip_gives_identical_embeddings(checkpoint: Path, trained: TrainResult) -> None:
    x = torch.from_numpy(stroke_images(32, seed=1)).float().div(255).unsqueeze(1)
    pca = trained.pixel_pca
    assert pca is not None  # the default appends the pixels' principal components to the code
    with torch.inference_mode():
        code = F.normalize(apply_whitening(trained.model.encode(x), trained.whitening), dim=1)
        linear = F.normalize((x.flatten(1) - pca["mean"]) @ pca["matrix"], dim=1)
        weight = trained.model.config.pixel_pca_weight
        expected = F.normalize(torch.cat([code, weight * linear], 1), dim=1)
    first = registry.create("cdae", checkpoint=checkpoint).embed_batch(x)
    second = CDAEEmbedder(checkpoint=checkpoint).embed_batch(x)
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
        registry.create("cdae", checkpoint=bad)


def test_torch_file_that_is_not_a_cdae_checkpoint_raises_value_error(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, other)
    with pytest.raises(ValueError, match="not a CDAE checkpoint"):
        load_checkpoint(other)


def test_cdae_needs_a_checkpoint() -> None:
    assert registry.get_spec("cdae").trainable
    with pytest.raises(registry.CheckpointRequired):
        registry.create("cdae")


def test_registered_cdae_meets_the_embedder_contract(checkpoint: Path) -> None:
    embedder = registry.create("cdae", checkpoint=checkpoint)
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)),  # RGB, odd size
        Image.fromarray(stroke_images(1)[0]),  # greyscale at the training size
        Image.new("L", (28, 28)),  # all black
    ]
    vectors = embedder.embed(pictures)
    assert vectors.shape == (3, embedder.dim)
    assert vectors.dtype == np.float32
    assert not np.isnan(vectors).any()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors, embedder.embed(pictures))  # deterministic
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert embedder.version == "cdae-" + sha[:12]
    assert embedder.describe()["whitened"] is True


def test_preprocess_matches_the_training_pixels(checkpoint: Path) -> None:
    embedder = CDAEEmbedder(checkpoint=checkpoint)
    pixels = stroke_images(1)[0]
    tensor = embedder.preprocess(Image.fromarray(pixels).convert("RGB"))
    assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor[0].numpy(), pixels.astype(np.float32) / 255)
    big = prepare_image(Image.new("RGB", (56, 56), "white"), config=embedder.config)
    assert big.shape == (28, 28) and big.dtype == np.uint8 and (big == 255).all()
