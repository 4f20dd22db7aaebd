"""Where the near-duplicate threshold of a photo collection should sit, measured.

Codes of every INRIA Holidays dev photo and of altered copies of them (``app.bench.alterations``,
weak / standard / strong), computed once and cached; then, without re-embedding:

- ``scores``: per alteration, the cosine of a copy to its original (min, 1st percentile, median)
  against the cosine of each photo to its nearest *other* photo, split into the same scene
  (another shot in its Holidays group: the hard negatives) and any other scene; for the raw codes
  and for the collection's whitened codes (fitted on the whole collection, as the service does).
- ``sweep``: pair precision and recall of "same connected component" at each threshold, on
  samples of originals copied (seeds), for each strength, on either half of the groups.

    python benchmarks/duplicate_threshold.py scores --json
    python benchmarks/duplicate_threshold.py sweep --json

Codes are cached under --cache (one .npz per strength and embedder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from app.bench.alterations import ALTERATIONS, STRENGTHS, alter, encode
from app.imaging.decode import ImageLimits, decode_image
from index.rerank import fit_whitening
from models import registry

ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "inria-holidays-dev" / "jpg"
DEFAULT = "efficientnet_lite0"
HALVES = {"groups 1000-1074": range(1000, 1075), "groups 1075-1149": range(1075, 1150)}


def _decode(data: bytes):  # type: ignore[no-untyped-def]
    return decode_image(data, limits=ImageLimits()).image


def codes(spec: str, *, strength: str, cache: Path) -> dict[str, np.ndarray]:
    """{"original": (n, d), alteration: (n, d)} unit codes, rows in sorted file-name order."""
    key = hashlib.sha256(f"{spec}|{strength}|v1".encode()).hexdigest()[:12]
    path = cache / f"dup-{key}.npz"
    if path.is_file():
        with np.load(path) as archive:
            return {k: archive[k] for k in archive.files}
    names = sorted(p.name for p in ROOT.glob("*.jpg"))
    embedder = registry.create(spec, download=False)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("original", *ALTERATIONS)}
    started = time.perf_counter()
    for start in range(0, len(names), 8):
        originals = [_decode((ROOT / n).read_bytes()) for n in names[start : start + 8]]
        if strength == "standard":
            out["original"].append(embedder.embed(originals))
        for alteration in ALTERATIONS:
            copies = [_decode(encode(alter(im, name=alteration, strength=strength))) for im in originals]
            out[alteration].append(embedder.embed(copies))
    print(f"{spec} {strength}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    arrays = {k: np.concatenate(v) for k, v in out.items() if v}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def first_of_each_content(names: list[str]) -> np.ndarray:
    """(n,) bool: identical files are imported once, so keep the first of each content (Holidays
    dev has three pairs of identical files in different groups)."""
    digests = [hashlib.sha256((ROOT / n).read_bytes()).hexdigest() for n in names]
    return np.asarray([digests.index(d) == i for i, d in enumerate(digests)])


def groups_of(names: list[str]) -> np.ndarray:
    return np.asarray([int(n[:4]) for n in names], dtype=np.int64)


def score_table(*, originals: np.ndarray, copies: dict[str, np.ndarray], groups: np.ndarray) -> dict:
    sims = originals @ originals.T
    np.fill_diagonal(sims, -1.0)
    same = groups[:, None] == groups[None, :]
    nearest_same = np.where(same, sims, -1.0).max(1)
    nearest_other = np.where(~same, sims, -1.0).max(1)
    table: dict[str, dict[str, float]] = {}
    for name, rows in copies.items():
        to_own = np.sum(rows * originals, axis=1)
        table[name] = {
            "min": round(float(to_own.min()), 4),
            "p01": round(float(np.quantile(to_own, 0.01)), 4),
            "p05": round(float(np.quantile(to_own, 0.05)), 4),
            "median": round(float(np.median(to_own)), 4),
        }
    has_same = nearest_same > -1
    for label, values in (
        ("nearest same scene", nearest_same[has_same]),
        ("nearest other scene", nearest_other),
    ):
        table[label] = {
            "max": round(float(values.max()), 4),
            "p99": round(float(np.quantile(values, 0.99)), 4),
            "p95": round(float(np.quantile(values, 0.95)), 4),
            "median": round(float(np.median(values)), 4),
        }
    return table


def pair_counts(sims: np.ndarray, *, family: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(true positive pairs, predicted pairs, true pairs) of same-component at cosine >= threshold."""
    left, right = np.nonzero(np.triu(sims >= threshold, k=1))
    n = len(sims)
    graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(n, n))
    _, component = connected_components(graph, directed=False)

    def pairs_within(labels: np.ndarray) -> int:
        _, sizes = np.unique(labels, return_counts=True)
        return int((sizes * (sizes - 1) // 2).sum())

    both = component.astype(np.int64) * (family.max() + 1) + family
    return pairs_within(both), pairs_within(component), pairs_within(family)


def sweep(
    *,
    data: dict[str, dict[str, np.ndarray]],
    names: list[str],
    thresholds: list[float],
    seeds: int,
    sample: int,
) -> list[dict]:
    groups = groups_of(names)
    rows = []
    originals = data["standard"]["original"]
    first = first_of_each_content(names)
    for strength in STRENGTHS:
        for half, span in {"all": range(0, 10_000), **HALVES}.items():
            keep = np.flatnonzero(np.isin(groups, list(span)) & first)
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                chosen = rng.choice(keep, size=min(sample, len(keep)), replace=False)
                parts = [originals[keep]]
                family = [keep]
                for alteration in ALTERATIONS:
                    parts.append(data[strength][alteration][chosen])
                    family.append(chosen)
                raw = np.concatenate(parts)
                fam = np.concatenate(family)
                whitened = fit_whitening(raw, dim=128).apply(raw)
                for kind, vectors in (("raw", raw), ("whitened", whitened)):
                    sims = vectors @ vectors.T
                    for threshold in thresholds:
                        tp, predicted, true = pair_counts(sims, family=fam, threshold=threshold)
                        rows.append(
                            {
                                "strength": strength,
                                "half": half,
                                "seed": seed,
                                "codes": kind,
                                "threshold": threshold,
                                "precision": tp / predicted if predicted else 1.0,
                                "recall": tp / true,
                            }
                        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=["scores", "sweep"])
    parser.add_argument("--embedder", default=DEFAULT)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-dup-cache"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = sorted(p.name for p in ROOT.glob("*.jpg"))
    data = {s: codes(args.embedder, strength=s, cache=args.cache) for s in STRENGTHS}
    originals = data["standard"]["original"]
    if args.study == "scores":
        out: object = {}
        whitening = fit_whitening(np.concatenate([originals, *data["standard"].values()]), dim=128)
        for kind in ("raw", "whitened"):
            for strength in STRENGTHS:
                apply = whitening.apply if kind == "whitened" else (lambda x: x)
                copies = {k: apply(v) for k, v in data[strength].items() if k != "original"}
                keep = first_of_each_content(names)
                table = score_table(
                    originals=apply(originals)[keep],
                    copies={k: v[keep] for k, v in copies.items()},
                    groups=groups_of(names)[keep],
                )
                out[f"{kind} {strength}"] = table  # type: ignore[index]
                print(f"== {kind} codes, {strength} alterations", file=sys.stderr)
                for row, values in table.items():
                    print(
                        f"  {row:<22} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()),
                        file=sys.stderr,
                    )
    else:
        thresholds = [round(t, 3) for t in np.arange(0.70, 0.985, 0.01)]
        out = sweep(data=data, names=names, thresholds=thresholds, seeds=args.seeds, sample=args.sample)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
