"""``cbir bench quality``: the generalisation suite, every method on every data set, in one run.

For each set of ``app.bench.quality_sets`` (a database part and held-out queries, same label
relevant): raw pixels, PCA, the tutorial CDAE, cbir's default CDAE (both trained without labels on
the database part), and the configuration the labelled selection picks on the database part
(``app.learning.candidates``), each scored with the metric code of ``cbir eval`` (P@10, mAP@all).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.bench.quality_sets import SET_NAMES, QualitySet, load_set
from index.metrics import evaluate_retrieval
from models import cdae

PCA_DIMS = 64
METHODS = ("pixels", "pca", "cdae-tutorial", "cdae-default", "selected")
Say = Callable[[str], None]


@dataclass(frozen=True)
class QualityRow:
    set: str
    method: str
    p_at_10: float
    map_all: float
    seconds: float  # training (or fitting) plus embedding
    note: str = ""


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """(n, d) -> float32 rows of unit length (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def score(data: QualitySet, *, db: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    """(P@10, mAP@all) of the queries ranked against the database by cosine."""
    result = evaluate_retrieval(
        query_vectors=unit_rows(queries),
        query_labels=data.query_labels,
        db_vectors=unit_rows(db),
        db_labels=data.db_labels,
    )
    return float(result["p_at_10"]), float(result["map_all"])


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def pca_codes(db: np.ndarray, queries: np.ndarray, *, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean-centred projections on the database's top ``dims`` principal components."""
    mean = db.mean(0)
    _, _, components = np.linalg.svd(db - mean, full_matrices=False)
    basis = components[: min(dims, len(components))].T
    return (db - mean) @ basis, (queries - mean) @ basis


def cdae_codes(
    data: QualitySet,
    *,
    preset: str,
    device: torch.device,
    seed: int,
    epochs: int | None,
    overrides: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Train the preset (with ``overrides``) on the database images, no labels; codes of database
    and queries as the embedder serves them."""
    config = cdae.CDAEConfig.from_dict({**cdae.CDAEConfig.preset(preset).to_dict(), **(overrides or {})})
    runs = cdae.epochs_for(config, images=len(data.db_images), epochs=epochs)
    result = cdae.train_cdae(data.db_images, config=config, epochs=runs, device=device, seed=seed)

    def codes(images: np.ndarray) -> np.ndarray:
        return cdae.embed_uint8(result, torch.from_numpy(images), config=config).cpu().numpy()

    return codes(data.db_images), codes(data.query_images), f"{runs} epochs"


def run_set(
    data: QualitySet,
    *,
    methods: tuple[str, ...],
    device: torch.device,
    seed: int = 0,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    say: Say = lambda _: None,
) -> list[QualityRow]:
    """Every method on one set; ``overrides`` change the default CDAE's config (an ablation)."""
    rows: list[QualityRow] = []

    def add(method: str, started: float, db: np.ndarray, queries: np.ndarray, note: str = "") -> None:
        p10, mean_ap = score(data, db=db, queries=queries)
        rows.append(QualityRow(data.name, method, p10, mean_ap, time.perf_counter() - started, note))
        say(f"  {data.name:<18} {method:<14} P@10 {p10:.4f}  mAP@all {mean_ap:.4f}  {note}")

    db_pixels, query_pixels = _flat(data.db_images), _flat(data.query_images)
    for method in methods:
        started = time.perf_counter()
        if method == "pixels":
            add(method, started, db_pixels, query_pixels)
        elif method == "pca":
            add(method, started, *pca_codes(db_pixels, query_pixels, dims=PCA_DIMS), f"{PCA_DIMS} dims")
        elif method in ("cdae-tutorial", "cdae-default"):
            preset = method.removeprefix("cdae-")
            changed = overrides if preset == "default" else None
            codes = cdae_codes(
                data, preset=preset, device=device, seed=seed, epochs=epochs, overrides=changed
            )
            add(method, started, *codes)
        elif method == "selected":
            add(method, started, *selected_codes(data, device=device, seed=seed))
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return rows


def selected_codes(
    data: QualitySet, *, device: torch.device, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """What the labelled selection activates when the database part is the collection."""
    from app.learning.candidates import select_embedder

    selection = select_embedder(data.db_images, data.db_labels, seed=seed, device=device)
    return selection.encode(data.db_images), selection.encode(data.query_images), selection.winner


def run_suite(
    *,
    datasets_dir: Path,
    sets: tuple[str, ...] = SET_NAMES,
    methods: tuple[str, ...] = METHODS,
    db: int,
    queries: int,
    device: torch.device,
    seed: int = 0,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    say: Say = lambda _: None,
) -> list[QualityRow]:
    rows: list[QualityRow] = []
    for name in sets:
        data = load_set(name, datasets_dir=datasets_dir, db=db, queries=queries)
        say(f"{name}: {len(data.db_images)} stored, {len(data.query_images)} queries ({data.about})")
        rows.extend(
            run_set(
                data, methods=methods, device=device, seed=seed, epochs=epochs, overrides=overrides, say=say
            )
        )
    return rows


def summary(rows: list[QualityRow], *, db: int, queries: int) -> dict[str, Any]:
    """What ``--json`` prints: per set and method, P@10 and mAP@all; and whether the default
    CDAE beats raw pixels on both figures on every set."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        table.setdefault(row.set, {})[row.method] = {
            "p_at_10": round(row.p_at_10, 4),
            "map_all": round(row.map_all, 4),
            "seconds": round(row.seconds, 1),
        }
    beats = {
        name: methods["cdae-default"]["p_at_10"] > methods["pixels"]["p_at_10"]
        and methods["cdae-default"]["map_all"] > methods["pixels"]["map_all"]
        for name, methods in table.items()
        if "cdae-default" in methods and "pixels" in methods
    }
    return {
        "sets": table,
        "default_beats_pixels": beats,
        "default_beats_pixels_everywhere": bool(beats) and all(beats.values()),
        "db_cap": db,
        "queries_cap": queries,
        "rows": [asdict(row) for row in rows],
    }


def format_table(rows: list[QualityRow]) -> list[str]:
    lines = [f"{'set':<18} {'method':<14} {'P@10':>7} {'mAP@all':>8} {'seconds':>8}  note"]
    for row in rows:
        lines.append(
            f"{row.set:<18} {row.method:<14} {row.p_at_10:>7.4f} {row.map_all:>8.4f} "
            f"{row.seconds:>8.1f}  {row.note}"
        )
    return lines
