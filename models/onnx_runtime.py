"""ONNX Runtime for CNN neural codes on the CPU: the trunk exported once, checked, cached.

The export covers the network part of ``CNNEmbedder._forward`` (the trunk: a normalised image batch
in, maps or a fully connected activation out); the pooling (average, MAC, GeM, R-MAC) runs after it
in torch, as it does after torch's trunk. Height and width stay free for map layers, so whole images
of any shape run in ONNX Runtime; fully connected layers (``fc6``, ``fc7``) are exported at the crop
size only, and a batch of another shape (``input=whole``) runs in torch.

Exports are cached as ``<cache_dir>/<embedder version>-<dyn|HxW>-trunk-opset<N>.onnx``; the service
passes ``CBIR_DATA_DIR/onnx`` (the version already names the weights
file's SHA-256 and every option that changes the codes). Before a session is used, its
L2-normalised codes are compared with torch's on a random batch (``MAX_DIFF``); a failed export,
load or check logs a warning and the embedder keeps running in torch. Either way the vectors agree
within ``MAX_DIFF``, so the runtime is not part of the embedder version. Which runtime ``auto``
uses is measured in ``models/runtime_choice.py``.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.base import l2_normalise

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "auto")
MAX_DIFF = 1e-3  # largest absolute difference allowed between torch's and ONNX's normalised codes
OPSET = 17


def available() -> bool:
    """Whether onnxruntime and onnx (the exporter needs it) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


Stage = Callable[[torch.Tensor], torch.Tensor]


class _Trunk(nn.Module):
    """The module to export: ``trunk`` applied to a batch; ``model`` is registered so that its
    weights become ONNX initialisers instead of constants."""

    def __init__(self, model: nn.Module, trunk: Stage) -> None:
        super().__init__()
        self.model = model
        self._trunk = trunk

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self._trunk(batch)


class OnnxCodes:
    """An ONNX Runtime session computing the trunk: (n, 3, H, W) float32 -> (n, C, h, w) maps or
    (n, d) activations, float32."""

    def __init__(self, session: Any, *, size: tuple[int, int] | None, path: Path | None) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        self.size = size  # None: any height and width
        self.path = path

    def accepts(self, shape: torch.Size | tuple[int, ...]) -> bool:
        return self.size is None or tuple(shape[2:]) == self.size

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (codes,) = self._session.run(None, {self._input: pixels})
        return torch.from_numpy(codes)


def cache_name(version: str, size: tuple[int, int] | None) -> str:
    shape = "dyn" if size is None else f"{size[0]}x{size[1]}"
    return f"{version}-{shape}-trunk-opset{OPSET}.onnx"


def export(module: nn.Module, *, example: torch.Tensor, dynamic_hw: bool) -> bytes:
    """The ONNX bytes of ``module`` traced on ``example``; the batch axis is always free."""
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    # a dynamic height and width give maps of a dynamic size (only map layers are exported so)
    out_axes = {0: "batch", 2: "map_height", 3: "map_width"} if dynamic_hw else {0: "batch"}
    buffer = io.BytesIO()
    # no_grad: a model that already ran under inference_mode (a deferred export) cannot be traced
    # with autograd on
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
        # (not a dependency); its deprecation and tracer warnings say nothing about this export.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            dynamo=False,
            input_names=["images"],
            output_names=["codes"],
            dynamic_axes={"images": axes, "codes": out_axes},
            opset_version=OPSET,
        )
    return buffer.getvalue()


def _session(model: bytes, *, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the same budget as torch (CBIR_TORCH_THREADS)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _max_diff(session: Any, *, trunk: Stage, finish: Stage, sizes: list[tuple[int, int]]) -> float:
    """Largest difference of normalised codes (``finish`` after each trunk), ONNX vs torch, over a
    seeded random batch per size."""
    onnx_trunk = OnnxCodes(session, size=None, path=None)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for height, width in sizes:
        batch = torch.randn((2, 3, height, width), generator=generator)
        with torch.inference_mode():
            expected = l2_normalise(finish(trunk(batch).float()))
            got = l2_normalise(finish(onnx_trunk(batch)))
        worst = max(worst, float((expected - got).abs().max()))
    return worst


def prepare(
    *,
    model: nn.Module,
    trunk: Stage,
    finish: Stage,
    version: str,
    size: tuple[int, int],
    dynamic_hw: bool,
    cache_dir: Path | None,
    threads: int | None = None,
) -> OnnxCodes | None:
    """An ONNX session computing ``trunk`` (torch's, the reference), exported once per version and
    shape; ``finish`` (the pooling, in torch) turns either trunk's output into raw codes for the check.

    ``size`` is the (H, W) the export is traced and always checked at; with ``dynamic_hw`` a second,
    odd size is checked too. Returns None (torch keeps running, a warning says why) when the export,
    the session or the check fails. ``cache_dir`` None: exported in memory, nothing written."""
    threads = threads or torch.get_num_threads()
    fixed = None if dynamic_hw else size
    sizes = [size] + ([(size[0] + 32, size[1] + 64)] if dynamic_hw else [])
    path = cache_dir / cache_name(version, fixed) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            session = _session(path.read_bytes(), threads=threads)
            diff = _max_diff(session, trunk=trunk, finish=finish, sizes=sizes)
        except Exception as exc:  # truncated or foreign file: export again
            log.warning("cached ONNX export %s is unusable (%s); exporting again", path, exc)
        else:
            if diff <= MAX_DIFF:
                log.info("ONNX codes of %s loaded from %s", version, path)
                return OnnxCodes(session, size=fixed, path=path)
            log.warning("cached ONNX export %s differs from torch by %.2g; exporting again", path, diff)
    try:
        module = _Trunk(model, trunk).eval()
        example = torch.randn((2, 3, *size), generator=torch.Generator().manual_seed(1))
        data = export(module, example=example, dynamic_hw=dynamic_hw)
        session = _session(data, threads=threads)
        diff = _max_diff(session, trunk=trunk, finish=finish, sizes=sizes)
    except Exception as exc:  # an exporter or runtime limitation must never stop the service
        log.warning("ONNX export of %s failed (%s: %s); running in torch", version, type(exc).__name__, exc)
        return None
    if diff > MAX_DIFF:
        log.warning(
            "ONNX export of %s differs from torch by %.2g (more than %g); running in torch",
            version,
            diff,
            MAX_DIFF,
        )
        return None
    if path is not None:
        try:
            write_atomically(path, data)
        except OSError as exc:  # a read-only data folder costs an export per start, nothing more
            log.warning("could not cache the ONNX export of %s in %s: %s", version, path.parent, exc)
        else:
            log.info("ONNX codes of %s exported to %s (max diff %.1e)", version, path, diff)
    return OnnxCodes(session, size=fixed, path=path)


def write_atomically(path: Path, data: bytes) -> None:
    """Another process reading the cache sees the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
