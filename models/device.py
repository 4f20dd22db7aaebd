"""Choose the torch device once: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """Return the device for ``preference`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    Raises ValueError when an explicit device is asked for but not available, so a
    misconfigured GPU host fails at start instead of silently running on the CPU.
    """
    preference = preference.strip().lower()
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {preference!r} requested but Apple MPS is not available")
    if device.type not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"unknown device {preference!r}; use auto, cpu, cuda[:N] or mps")
    return device
