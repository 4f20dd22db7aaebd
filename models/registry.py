"""Embedder registry: names -> factories, with the metadata a service needs before loading."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.base import Embedder


class UnknownEmbedder(KeyError):
    """No embedder is registered under this name."""


class CheckpointRequired(ValueError):
    """The embedder is trained per collection and has no checkpoint yet."""


@dataclass(frozen=True)
class EmbedderSpec:
    name: str
    factory: Callable[..., Embedder]
    description: str
    trainable: bool = False  # True: weights come from a checkpoint trained on the collection


_REGISTRY: dict[str, EmbedderSpec] = {}


def register(spec: EmbedderSpec) -> EmbedderSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"embedder {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> EmbedderSpec:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownEmbedder(f"unknown embedder {name!r}; known: {known}") from None


def names() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def create(name: str, *, checkpoint: Path | None = None, device: torch.device | None = None) -> Embedder:
    """Build an embedder; trainable ones need ``checkpoint`` (never random weights silently)."""
    spec = get_spec(name)
    if spec.trainable:
        if checkpoint is None:
            raise CheckpointRequired(f"embedder {name!r} has no trained checkpoint yet; train one first")
        return spec.factory(checkpoint=checkpoint, device=device)
    return spec.factory(device=device)


_builtins_loaded = False


def _ensure_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    # Imported for their register() side effects; kept here so importing the registry is cheap.
    import models.cdae  # noqa: F401
    import models.pixels  # noqa: F401
