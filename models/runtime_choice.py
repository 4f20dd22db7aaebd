"""Which runtime computes a CNN's codes here (``CBIR_CNN_RUNTIME=auto``): torch and ONNX Runtime
timed on the embedder's own input shape, the faster one kept.

Both run the same random batch (``BATCH`` images) ``ROUNDS`` times after one untimed pass each,
interleaved (torch, ONNX, torch, ONNX ...) so that a burst of load from elsewhere slows both; each
keeps its fastest round. The choice is cached beside the ONNX export as
``<version>-<device>-t<threads>.runtime.json`` (per embedder version, device and thread count):
measured once, read at every later start. A choice file that cannot be read is measured again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.onnx_runtime import Stage, write_atomically

log = logging.getLogger(__name__)

BATCH = 4
ROUNDS = 3


@dataclass(frozen=True)
class Choice:
    """The runtime an embedder uses and why: ``requested`` (torch or onnx was asked for),
    ``measured`` (auto, timed now), ``cached`` (auto, timed at an earlier start), ``cpu_only`` (ONNX
    Runtime runs on the CPU only), ``unavailable`` (onnxruntime not installed) or ``export_failed``."""

    runtime: str
    reason: str
    torch_img_s: float | None = None
    onnx_img_s: float | None = None
    shape: tuple[int, ...] | None = None  # (batch, 3, H, W) of the measurement

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["shape"] = list(self.shape) if self.shape else None
        return out


def choice_path(cache_dir: Path, *, version: str, device: str, threads: int) -> Path:
    return cache_dir / f"{version}-{device}-t{threads}.runtime.json"


def measure(*, torch_codes: Stage, onnx_codes: Stage, shape: tuple[int, int]) -> Choice:
    """Images/s of both runtimes on a seeded random (BATCH, 3, *shape) batch; the faster wins."""
    batch = torch.randn((BATCH, 3, *shape), generator=torch.Generator().manual_seed(2))
    runs = {"torch": torch_codes, "onnx": onnx_codes}
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for run in runs.values():
            run(batch)  # untimed: kernels chosen, buffers allocated
        for _ in range(ROUNDS):
            for name, run in runs.items():
                began = time.perf_counter()
                run(batch)
                best[name] = min(best[name], time.perf_counter() - began)
    rates = {name: BATCH / max(seconds, 1e-9) for name, seconds in best.items()}
    return Choice(
        runtime="onnx" if rates["onnx"] > rates["torch"] else "torch",
        reason="measured",
        torch_img_s=round(rates["torch"], 2),
        onnx_img_s=round(rates["onnx"], 2),
        shape=(BATCH, 3, *shape),
    )


def read_choice(path: Path) -> Choice | None:
    """The cached choice, or None when there is none or it cannot be used."""
    try:
        raw = json.loads(path.read_text())
        shape = raw.get("shape")
        choice = Choice(
            runtime=str(raw["runtime"]),
            reason="cached",
            torch_img_s=raw.get("torch_img_s"),
            onnx_img_s=raw.get("onnx_img_s"),
            shape=tuple(int(s) for s in shape) if shape else None,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("runtime choice %s is unreadable (%s); measuring again", path, exc)
        return None
    return choice if choice.runtime in {"torch", "onnx"} else None


def write_choice(path: Path, choice: Choice) -> None:
    try:
        write_atomically(path, json.dumps(choice.as_dict(), indent=1).encode())
    except OSError as exc:  # a read-only data folder costs a measurement per start, nothing more
        log.warning("could not cache the runtime choice in %s: %s", path.parent, exc)
