"""The search by examples' default weights, measured (app/search/examples.py, docs/api.md).

Two studies with the service's own combination (``app.search.examples.combine``) and an exact
search over the collection's codes, the examples left out of the hits as the service leaves them:

- ``holidays``: the INRIA Holidays dev photos (../shared/datasets/inria-holidays-dev) with the
  default efficientnet_lite0 codes. Groups of 3 or more photos: the group's query photo and one
  more as positives, the rest of the group held out. Two positives against one: recall@10 and AP
  of the held-out photos. The negative: the best-ranked photo of another group, with a mirrored
  copy of it added to the collection; per negative weight, how often the copy is in the top 10
  and the held-out recall@10.
- ``mnist``: the MNIST demo collection (`cbir demo`: 60,000 training digits and the embedder it
  chose) read from its data folder. Per trial a random digit and one (or three) more of its class
  as positives: precision@10 of the class. Negatives: (a) the best-ranked digit of another class,
  (b) the first hit whatever its class; a copy of it shifted by one pixel is added; per negative
  weight, how often the copy is in the top 10 and precision@10 of the positives' class.

    python -m benchmarks.examples_quality holidays
    python -m benchmarks.examples_quality mnist --data-dir data
"""

from __future__ import annotations

import argparse
import functools
import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from app.imaging.decode import ImageLimits, decode_image
from app.ingest.sources.datasets import load_mnist
from app.search.examples import combine
from index.rerank import fit_whitening
from models import registry

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HOLIDAYS = DATASETS / "inria-holidays-dev"
LITE0 = "efficientnet_lite0:input=whole,pooling=rmac,sizes=288"  # the collection default
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def ranking(query: np.ndarray, db: np.ndarray, *, leave_out: set[int]) -> list[int]:
    """Row numbers of ``db`` by decreasing cosine with the (1, d) ``query``, ``leave_out`` removed."""
    order = np.argsort(-(db @ query[0]), kind="stable")
    return [int(i) for i in order if int(i) not in leave_out]


def query_of(db: np.ndarray, positives: list[int], negatives: list[int], weight: float) -> np.ndarray:
    return combine(
        positives=db[positives],
        negatives=db[negatives] if negatives else db[:0],
        positive_weight=1.0,
        negative_weight=weight,
    )


def average_precision(ranked: list[int], relevant: set[int]) -> float:
    hits, total = 0, 0.0
    for rank, row in enumerate(ranked, start=1):
        if row in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def holidays(args: argparse.Namespace) -> dict[str, object]:
    truth = json.loads((HOLIDAYS / "groundtruth.json").read_text())
    names = sorted(p.name for p in (HOLIDAYS / "jpg").glob("*.jpg"))
    row = {n: i for i, n in enumerate(names)}
    cache = args.cache / "holidays-lite0.npy"
    embedder = registry.create(LITE0, download=False)

    def embed(images: list[Image.Image]) -> np.ndarray:
        return unit(np.asarray(embedder.embed(images), dtype=np.float32))

    def photo(name: str) -> Image.Image:
        return decode_image((HOLIDAYS / "jpg" / name).read_bytes(), limits=ImageLimits()).image

    if cache.is_file():
        codes = np.load(cache)
    else:
        codes = np.concatenate([embed([photo(n) for n in names[i : i + 8]]) for i in range(0, len(names), 8)])
        args.cache.mkdir(parents=True, exist_ok=True)
        np.save(cache, codes)
    groups = [(row[q], [row[o] for o in others]) for q, others in sorted(truth.items()) if len(others) >= 2]

    @functools.cache
    def mirrored(negative: int) -> np.ndarray:
        """The (d,) code of a mirrored copy of the photo in row ``negative``."""
        return embed([ImageOps.mirror(photo(names[negative]))])[0]

    # As served: the codes alone, and whitened to 128 dims (fitted on the collection's codes, as a
    # collection of 300 or more photos has it after its import); a copy goes through the same fit.
    whitening = fit_whitening(codes, dim=128)
    variants = {"codes": lambda rows: rows, "whitened 128": whitening.apply}
    return {
        "study": "holidays",
        "embedder": LITE0,
        "groups": len(groups),
        **{name: _holidays_variant(apply, codes, groups, mirrored) for name, apply in variants.items()},
    }


def _holidays_variant(
    apply: Callable[[np.ndarray], np.ndarray],
    raw: np.ndarray,
    groups: list[tuple[int, list[int]]],
    mirrored: Callable[[int], np.ndarray],
) -> dict[str, object]:
    """Per group: one and two positives; the best photo of another place as the negative, with
    a mirrored copy of it added."""
    codes = unit(apply(raw))
    one, two = [], []
    copy_in: dict[float, list[bool]] = {w: [] for w in WEIGHTS}
    kept: dict[float, list[float]] = {w: [] for w in WEIGHTS}
    for query, others in groups:
        group = {query, *others}
        positives = [query, others[0]]
        held = group - set(positives)
        leave = set(positives)
        by_one = ranking(query_of(codes, positives[:1], [], 0), codes, leave_out=leave)
        by_two = ranking(query_of(codes, positives, [], 0), codes, leave_out=leave)
        one.append((len(held & set(by_one[:10])) / len(held), average_precision(by_one, held)))
        two.append((len(held & set(by_two[:10])) / len(held), average_precision(by_two, held)))
        negative = next(i for i in by_two if i not in group)
        db = np.concatenate([codes, unit(apply(mirrored(negative)[None]))])
        copy = len(db) - 1
        for weight in WEIGHTS:
            top = ranking(query_of(db, positives, [negative], weight), db, leave_out=leave | {negative})[:10]
            copy_in[weight].append(copy in top)
            kept[weight].append(len(held & set(top)) / len(held))
    return {
        "positives": {
            "one": {"recall@10": _mean([r for r, _ in one]), "AP": _mean([a for _, a in one])},
            "two": {"recall@10": _mean([r for r, _ in two]), "AP": _mean([a for _, a in two])},
        },
        "negative": [
            {"weight": w, "copy in top 10": _mean(copy_in[w]), "held-out recall@10": _mean(kept[w])}
            for w in WEIGHTS
        ],
    }


def mnist(args: argparse.Namespace) -> dict[str, object]:
    connection = sqlite3.connect(args.data_dir / "cbir.sqlite3")
    embedder_name, version, checkpoint = connection.execute(
        "SELECT c.embedder, c.embedder_version, k.path FROM collections c "
        "LEFT JOIN checkpoints k ON k.id = c.checkpoint_id WHERE c.name = ?",
        (args.collection,),
    ).fetchone()
    rows = connection.execute(
        "SELECT i.metadata, e.vector FROM images i JOIN embeddings e ON e.image_id = i.id "
        "WHERE e.embedder_version = ? ORDER BY i.id",
        (version,),
    ).fetchall()
    meta = [json.loads(m) for m, _ in rows]
    codes = unit(np.stack([np.frombuffer(v, dtype="<f4") for _, v in rows]))
    labels = np.asarray([int(m["label"]) for m in meta])
    pixels, _ = load_mnist("train", datasets_dir=DATASETS, download_dir=args.cache / "mnist")
    embedder = registry.create(
        embedder_name, checkpoint=None if checkpoint is None else args.data_dir / checkpoint, download=False
    )
    rng = np.random.default_rng(0)
    precision: dict[int, list[float]] = {1: [], 2: [], 4: []}
    cases = {"other class": "other", "first hit": "first"}
    copy_in = {c: {w: [] for w in WEIGHTS} for c in cases}
    kept: dict[str, dict[float, list[float]]] = {c: {w: [] for w in WEIGHTS} for c in cases}
    for _ in range(args.trials):
        first = int(rng.integers(len(codes)))
        same = np.flatnonzero(labels == labels[first])
        mates = [int(i) for i in rng.choice(same[same != first], 3, replace=False)]
        chosen = [first, *mates]
        for count in precision:
            positives = chosen[:count]
            top = ranking(query_of(codes, positives, [], 0), codes, leave_out=set(chosen))[:10]
            precision[count].append(float(np.mean(labels[top] == labels[first])))
        positives = chosen[:2]
        plain = ranking(query_of(codes, positives, [], 0), codes, leave_out=set(positives))
        for case, how in cases.items():
            negative = plain[0] if how == "first" else next(i for i in plain if labels[i] != labels[first])
            index = int(meta[negative]["index"])
            shifted = Image.fromarray(np.roll(pixels[index], 1, axis=1))
            db = np.concatenate([codes, unit(np.asarray(embedder.embed([shifted]), dtype=np.float32))])
            copy = len(db) - 1
            for weight in WEIGHTS:
                query = query_of(db, positives, [negative], weight)
                top = ranking(query, db, leave_out=set(positives) | {negative})[:10]
                copy_in[case][weight].append(copy in top)
                same = [labels[i] == labels[first] for i in top if i != copy]
                kept[case][weight].append(float(np.mean(same)))
    return {
        "study": "mnist",
        "embedder": version,
        "trials": args.trials,
        "positives": {f"P@10 with {n}": _mean(v) for n, v in precision.items()},
        "negative": {
            case: [
                {
                    "weight": w,
                    "copy in top 10": _mean(copy_in[case][w]),
                    "P@10 of the class": _mean(kept[case][w]),
                }
                for w in WEIGHTS
            ]
            for case in cases
        },
    }


def _mean(values: list[float] | list[bool]) -> float:
    return round(float(np.mean(values)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=["holidays", "mnist"])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="mnist: the demo's data folder")
    parser.add_argument("--collection", default="mnist")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-examples"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = holidays(args) if args.study == "holidays" else mnist(args)
    print(json.dumps(result, indent=1), file=sys.stdout)


if __name__ == "__main__":
    main()
