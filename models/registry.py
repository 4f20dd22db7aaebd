"""Embedder registry: names -> factories, with the metadata a service needs before loading.

An embedder is chosen by a *spec string*: a registered name, optionally followed by options,
``name:key=value,key=value`` (lists joined by ``+``), for example
``efficientnet_lite0:input=whole,sizes=224+320,flip=1``. ``canonical()`` gives each choice one
spelling (options sorted, defaults dropped), which is what collections store.

Each concrete model module calls ``register`` when it is imported, and ``models/__init__.py``
imports them all, so the registry is full as soon as any part of ``models`` is imported; this
module imports none of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.base import Embedder


class UnknownEmbedder(KeyError):
    """No embedder is registered under this name."""


class InvalidEmbedderOptions(ValueError):
    """The spec string's options are malformed, unknown or out of range."""


class CheckpointRequired(ValueError):
    """The embedder is trained per collection and has no checkpoint yet."""


class WeightsMissing(RuntimeError):
    """Pretrained weights are not on disk and could not be downloaded; the message says where to put them."""


@dataclass(frozen=True)
class EmbedderSpec:
    name: str
    factory: Callable[..., Embedder]
    description: str
    trainable: bool = False  # True: weights come from a checkpoint trained on the collection
    # option name -> (default as text, help); the factory receives the options as keyword strings
    options: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # checks option values (raises ValueError) without building anything
    check_options: Callable[..., object] | None = None
    # True: loads downloadable weights (factory takes weights_dir, download, runtime, onnx_dir)
    pretrained: bool = False
    # pretrained: whether the weights are on this machine (weights_dir -> bool), never downloading
    weights_available: Callable[[Path | None], bool] | None = None


_REGISTRY: dict[str, EmbedderSpec] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_VALUE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


def register(spec: EmbedderSpec) -> EmbedderSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"embedder {spec.name!r} is already registered")
    if not _NAME.match(spec.name):
        raise ValueError(f"embedder name {spec.name!r} must match {_NAME.pattern}")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> EmbedderSpec:
    """The registered embedder of a name or spec string (options are ignored here)."""
    base = name.split(":", 1)[0]
    try:
        return _REGISTRY[base]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownEmbedder(f"unknown embedder {base[:48]!r}; known: {known}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def parse(text: str) -> tuple[EmbedderSpec, dict[str, str]]:
    """``name[:key=value,...]`` -> (spec, options as strings); unknown names or options raise."""
    spec = get_spec(text)
    _, _, raw = text.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not _VALUE.match(value):
            raise InvalidEmbedderOptions(
                f"embedder option {item[:40]!r} is malformed: write {spec.name}:key=value,key=value"
            )
        if key not in spec.options:
            allowed = ", ".join(sorted(spec.options)) or "none"
            raise InvalidEmbedderOptions(
                f"embedder {spec.name!r} has no option {key[:40]!r}; its options: {allowed}"
            )
        if key in options:
            raise InvalidEmbedderOptions(f"embedder option {key!r} is given twice")
        options[key] = value
    return spec, options


def canonical(text: str) -> str:
    """One spelling per choice: options sorted, those equal to their default dropped.

    Raises InvalidEmbedderOptions when the factory rejects a value, so a bad spec fails here,
    before anything is stored."""
    spec, options = parse(text)
    kept = {k: v for k, v in sorted(options.items()) if v != spec.options[k][0]}
    try:
        if spec.check_options is not None:
            spec.check_options(**kept)
    except (TypeError, ValueError) as exc:
        raise InvalidEmbedderOptions(f"embedder {spec.name!r}: {exc}") from None
    if not kept:
        return spec.name
    return spec.name + ":" + ",".join(f"{k}={v}" for k, v in kept.items())


def create(
    text: str,
    *,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    weights_dir: Path | None = None,
    download: bool = True,
    runtime: str = "torch",
    onnx_dir: Path | None = None,
    defer_runtime: bool = False,
) -> Embedder:
    """Build an embedder from a spec string; trainable ones need ``checkpoint`` and pretrained ones
    find their weights in ``weights_dir``, the torch cache or by download (never random weights).

    ``runtime`` (torch, onnx or auto), ``onnx_dir`` (where ONNX exports are cached) and
    ``defer_runtime`` (choose the runtime in ``prepare_runtime()``, not in ``load()``) reach
    pretrained embedders only; see ``models/onnx_runtime.py``."""
    spec, options = parse(text)
    if spec.trainable:
        if checkpoint is None:
            raise CheckpointRequired(f"embedder {spec.name!r} has no trained checkpoint yet; train one first")
        return spec.factory(checkpoint=checkpoint, device=device, **options)
    extra: dict[str, object] = (
        {
            "weights_dir": weights_dir,
            "download": download,
            "runtime": runtime,
            "onnx_dir": onnx_dir,
            "defer_runtime": defer_runtime,
        }
        if spec.pretrained
        else {}
    )
    try:
        return spec.factory(device=device, **extra, **options)
    except (TypeError, ValueError) as exc:
        raise InvalidEmbedderOptions(f"embedder {spec.name!r}: {exc}") from None
