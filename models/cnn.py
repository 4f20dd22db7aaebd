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

On the CPU the trunk can run in ONNX Runtime instead of torch (``runtime``, set by
``CBIR_CNN_RUNTIME``; see ``models/onnx_runtime.py``): same vectors within 1e-3, same version.
``auto`` times both and keeps the faster (``models/runtime_choice.py``). The export and the timing
run in ``load()``, or, with ``defer_runtime`` (the service), in ``prepare_runtime()`` called
later; until then the codes come from torch.

This module is the embedder and its registration, one per architecture. The catalogue of
networks is ``models/cnn_archs.py``, the options, views and pooling ``models/cnn_codes.py``, the
weights files ``models/cnn_weights.py``; their public names are importable from here too.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import onnx_runtime, runtime_choice
from models.base import Embedder, l2_normalise
from models.cnn_archs import ARCHS, Arch, Layer
from models.cnn_codes import (
    INPUTS,
    MAX_ASPECT,
    OPTION_HELP,
    POOLINGS,
    CodeOptions,
    centre_aspect,
    parse_options,
    pixels_of,
    pool,
    resize_pixels,
    rmac,
    rmac_regions,
    shorter_size,
)
from models.cnn_weights import Weights, fetch, file_sha256, locate_weights
from models.registry import EmbedderSpec, WeightsMissing, register

__all__ = [
    "ARCHS",
    "INPUTS",
    "MAX_ASPECT",
    "OPTION_HELP",
    "POOLINGS",
    "Arch",
    "CNNEmbedder",
    "CodeOptions",
    "Layer",
    "Weights",
    "fetch",
    "file_sha256",
    "locate_weights",
    "parse_options",
    "pool",
    "rmac",
    "rmac_regions",
]

log = logging.getLogger(__name__)


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
        defer_runtime: bool = False,
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
        self.defer_runtime = defer_runtime
        self._runtime_lock = threading.Lock()
        self._choice: runtime_choice.Choice | None = None
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
        if not self.defer_runtime:
            self._ensure_runtime()

    # which runtime computes the trunk: chosen once, in load() or later in prepare_runtime()
    @property
    def runtime_pending(self) -> bool:
        return self._choice is None

    def prepare_runtime(self) -> None:
        """Export, check and (auto) time the runtimes, once; the codes come from torch until done."""
        self.load()
        self._ensure_runtime()

    def _ensure_runtime(self) -> None:
        with self._runtime_lock:
            if self._choice is None:
                session, choice = self._choose()
                self._onnx, self._choice = session, choice
                log.info("%s computes its codes in %s (%s)", self._version, choice.runtime, choice.reason)

    def _choose(self) -> tuple[onnx_runtime.OnnxCodes | None, runtime_choice.Choice]:
        Choice = runtime_choice.Choice
        if self.runtime == "torch":
            return None, Choice("torch", "requested")
        if self.device.type != "cpu":
            if self.runtime == "onnx":
                log.warning(
                    "ONNX Runtime runs on the CPU only; %s stays in torch on %s", self.name, self.device
                )
            return None, Choice("torch", "cpu_only")
        if not onnx_runtime.available():
            if self.runtime == "onnx":
                log.warning("onnxruntime is not installed; %s runs in torch", self.name)
            return None, Choice("torch", "unavailable")
        assert self._version is not None
        maps = self.arch.layers[self.options.layer].maps
        crop = self.weights.crop
        path = None
        if self.runtime == "auto" and self.onnx_dir is not None:
            path = runtime_choice.choice_path(
                self.onnx_dir, version=self._version, device="cpu", threads=torch.get_num_threads()
            )
        cached = runtime_choice.read_choice(path) if path is not None else None
        if cached is not None and cached.runtime == "torch":
            return None, cached  # no export to load
        session = onnx_runtime.prepare(
            model=self._model,
            trunk=self._trunk_channels_last,
            finish=self._finish,
            version=self._version,
            size=(crop, crop),
            dynamic_hw=maps,  # maps take any size; fc layers only the size they were traced at
            cache_dir=self.onnx_dir,
        )
        if session is None:
            return None, Choice("torch", "export_failed")
        if self.runtime == "onnx":
            return session, Choice("onnx", "requested")
        if cached is None:
            cached = runtime_choice.measure(
                torch_codes=self._torch_codes,
                onnx_codes=lambda batch: self._finish(session(batch)),
                shape=self._typical_shape() if maps else (crop, crop),
            )
            if path is not None:
                runtime_choice.write_choice(path, cached)
        return (session if cached.runtime == "onnx" else None), cached

    def _typical_shape(self) -> tuple[int, int]:
        """(H, W) of a typical view: the crop, or a 4:3 landscape photo at the first size."""
        if self.options.input == "crop":
            return (self.weights.crop, self.weights.crop)
        short = (self.options.sizes or (self.weights.resize,))[0]
        return (short, round(short * 4 / 3))

    @property
    def active_runtime(self) -> str:
        """``onnx`` when ONNX Runtime computes the codes (of crop-sized batches at least), else ``torch``."""
        self.load()
        return "onnx" if self._onnx is not None else "torch"

    def runtime_info(self) -> dict[str, object] | None:
        """The runtime asked for, the one computing the codes now and why (``state`` pending until the
        choice is made: torch meanwhile); None before the weights are loaded."""
        if not self._loaded:
            return None
        choice = self._choice
        return {
            "requested": self.runtime,
            "active": "onnx" if self._onnx is not None else "torch",
            "state": "pending" if choice is None else "chosen",
            **(
                {"reason": None}
                if choice is None
                else {k: v for k, v in choice.as_dict().items() if k != "runtime"}
            ),
        }

    # preprocessing: each image becomes a list of views (scales, flips), each (3, H, W) float32
    def _normalise(self, view: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, H, W), normalised; channels-last in memory as it came."""
        return view.float().sub_(self._mean).div_(self._std)

    def _views(self, image: Image.Image) -> list[torch.Tensor]:
        """The uint8 (3, H, W) views of an image, resized (and cropped) by torch's antialiased
        kernels: Pillow's filters at a quarter of the time (codes within cosine 0.99997 of
        Pillow's resize on the Holidays photos, so the same embedder version)."""
        pixels = pixels_of(image)
        w = self.weights
        if self.options.input == "crop":
            # The centre crop only sees the middle of a panorama: cut that first, so the resize
            # never has to cap (and squash) the longer side.
            middle = centre_aspect(pixels, MAX_ASPECT)
            size = shorter_size(middle.shape[2], middle.shape[1], w.resize)
            scaled = resize_pixels(middle, size, w.interpolation)
            left = (scaled.shape[2] - w.crop) // 2
            top = (scaled.shape[1] - w.crop) // 2
            views = [scaled[:, top : top + w.crop, left : left + w.crop]]
        else:
            height, width = pixels.shape[1:]
            sizes = [
                shorter_size(width, height, s, min_side=self.arch.min_side)
                for s in self.options.sizes or (w.resize,)
            ]
            views = [resize_pixels(pixels, size, w.interpolation) for size in sizes]
        if self.options.flip:
            views += [v.flip(-1) for v in views]
        return views

    def preprocess(self, image: Image.Image) -> list[torch.Tensor]:  # type: ignore[override]
        return [self._normalise(view) for view in self._views(image)]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        session = self._onnx  # read once: the background choice may set it meanwhile
        if session is not None and session.accepts(batch.shape):
            return self._finish(session(batch))
        return self._torch_codes(batch)

    def _trunk_channels_last(self, batch: torch.Tensor) -> torch.Tensor:
        assert self._trunk is not None
        return self._trunk(batch.contiguous(memory_format=torch.channels_last))

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """The trunk's output -> (n, dim) raw codes: pooling for map layers, in torch."""
        out = out.float()
        if self.arch.layers[self.options.layer].maps:
            out = pool(out, how=self.options.pooling, p=self.options.p)
        return out

    def _torch_codes(self, batch: torch.Tensor) -> torch.Tensor:
        """Trunk, then pooling for map layers: (n, 3, H, W) -> (n, dim) raw codes, in torch."""
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                out = self._trunk_channels_last(batch)
        else:
            out = self._trunk_channels_last(batch)
        return self._finish(out)

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
            "runtime_choice": self.runtime_info(),
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
        defer_runtime: bool = False,
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
            defer_runtime=defer_runtime,
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
