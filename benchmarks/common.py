"""What the MNIST benchmarks share: command-line options, config overrides, batched embedding."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def base_parser(description: str, *, presets: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="default", choices=presets)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--queries", type=int, default=10_000, help="first N test images")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default=None, help="row label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--save", type=Path, default=None, help="keep the checkpoint here")
    return parser


def parse_overrides(items: list[str]) -> dict[str, object]:
    """["rotate_degrees=15", "consistency=cosine", "code_dim=null"] -> typed values (JSON)."""
    out: dict[str, object] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def embed_arrays(embedder, images: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """uint8 (n, 28, 28) MNIST arrays through the embedder's batch path (= its preprocess)."""
    x = torch.from_numpy(np.array(images))  # a writable copy: the IDX arrays are read-only
    return np.concatenate(
        [
            embedder.embed_batch(x[i : i + batch_size].unsqueeze(1).float() / 255.0)
            for i in range(0, len(x), batch_size)
        ]
    )
