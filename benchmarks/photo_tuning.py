"""The photo defaults, measured: which CNN configuration, and from how many images whitening helps.

Two studies on the INRIA Holidays dev split (../shared/datasets/inria-holidays-dev), with the
metric code ``cbir eval --groundtruth`` uses (``app.learning.groundtruth.rank_scores`` and
``index.metrics.evaluate_groundtruth``, INRIA's mAP over the full ranking):

- ``halves``: each embedder configuration on two disjoint halves of the dev groups (1000-1074
  and 1075-1149), each half its own collection and ground truth: codes alone, PCA-whitened to
  128 dims (fitted on that half, shrinkage 0.5), and whitened + alpha-QE 2.
- ``enough``: the whitening of the default configuration fitted on random subsamples of k codes
  (5 seeds each), evaluated on the whole dev ground truth: the image count from which it helps.
- ``collections``: collections of about k images (whole groups drawn at random, 10 draws), each
  whitened on its own codes as the service does, evaluated on its own queries.

    python benchmarks/photo_tuning.py halves --json
    python benchmarks/photo_tuning.py enough --json
    python benchmarks/photo_tuning.py collections --json

Codes are cached under --cache (one .npy per configuration) so a second study reuses them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from app.imaging.decode import ImageLimits, decode_image
from app.learning.groundtruth import rank_scores
from index.metrics import evaluate_groundtruth
from index.rerank import fit_whitening
from models import registry

ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "inria-holidays-dev"
CONFIGS = (
    "efficientnet_lite0:input=crop,pooling=avg",  # the 224 px centre crop, average pooling
    "efficientnet_lite0:input=whole,pooling=avg,sizes=288",
    "efficientnet_lite0:input=whole,pooling=gem,sizes=288",
    "efficientnet_lite0:input=whole,pooling=rmac,sizes=288",
)
DEFAULT = CONFIGS[-1]
HALVES = {"groups 1000-1074": range(1000, 1075), "groups 1075-1149": range(1075, 1150)}


def codes(spec: str, *, names: list[str], cache: Path) -> np.ndarray:
    """(n, d) float32 unit codes of the dev images in ``names`` order, decoded as the service does."""
    path = cache / f"{hashlib.sha256(spec.encode()).hexdigest()[:12]}.npy"
    if path.is_file():
        return np.load(path)
    embedder = registry.create(spec, download=False)
    rows = []
    started = time.perf_counter()
    for start in range(0, len(names), 8):
        images = [
            decode_image((ROOT / "jpg" / n).read_bytes(), limits=ImageLimits()).image
            for n in names[start : start + 8]
        ]
        rows.append(embedder.embed(images))
    vectors = np.concatenate(rows)
    print(f"{spec}: {len(names)} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def score(vectors: np.ndarray, *, names: list[str], truth: dict[str, list[str]], qe: int = 0) -> float:
    """INRIA mAP of the ground truth's queries ranked against all of ``vectors`` (itself excluded)."""
    row = {n: i for i, n in enumerate(names)}
    queries = np.asarray([row[q] for q in truth], dtype=np.int64)
    relevant = [np.asarray([row[r] for r in truth[q]], dtype=np.int64) for q in truth]
    scores = rank_scores(vectors, queries=queries, qe=qe)
    return round(float(evaluate_groundtruth(scores=scores, relevant=relevant)["map_all"]), 4)


def settings_of(vectors: np.ndarray, *, names: list[str], truth: dict[str, list[str]]) -> dict[str, float]:
    whitened = fit_whitening(vectors, dim=min(128, len(vectors))).apply(vectors)
    return {
        "plain": score(vectors, names=names, truth=truth),
        "whiten128": score(whitened, names=names, truth=truth),
        "whiten128_qe2": score(whitened, names=names, truth=truth, qe=2),
    }


def halves(
    *, names: list[str], truth: dict[str, list[str]], cache: Path, configs: tuple[str, ...] = CONFIGS
) -> list[dict[str, object]]:
    out = []
    for spec in configs:
        vectors = codes(spec, names=names, cache=cache)
        for half, groups in HALVES.items():
            keep = [i for i, n in enumerate(names) if int(n[:4]) in groups]
            part = [names[i] for i in keep]
            part_truth = {q: r for q, r in truth.items() if int(q[:4]) in groups}
            row = settings_of(vectors[keep], names=part, truth=part_truth)
            out.append(
                {"embedder": spec, "half": half, "images": len(keep), "queries": len(part_truth), **row}
            )
    return out


def enough(
    *, names: list[str], truth: dict[str, list[str]], cache: Path, seeds: int = 5
) -> list[dict[str, object]]:
    vectors = codes(DEFAULT, names=names, cache=cache)
    plain = score(vectors, names=names, truth=truth)
    out = []
    for k in (50, 100, 150, 200, 300, len(names)):
        found, found_qe = [], []
        for seed in range(seeds if k < len(names) else 1):
            sample = np.random.default_rng(seed).choice(len(names), size=k, replace=False)
            whitened = fit_whitening(vectors[sample], dim=min(128, k)).apply(vectors)
            found.append(score(whitened, names=names, truth=truth))
            found_qe.append(score(whitened, names=names, truth=truth, qe=2))
        out.append(
            {
                "k": k,
                "dim": min(128, k),
                "plain": plain,
                "whitened_mean": round(float(np.mean(found)), 4),
                "whitened_min": min(found),
                "whitened_max": max(found),
                "whitened_qe2_mean": round(float(np.mean(found_qe)), 4),
                "seeds": len(found),
            }
        )
    return out


def collections(
    *, names: list[str], truth: dict[str, list[str]], cache: Path, seeds: int = 10
) -> list[dict[str, object]]:
    """As the service fits it: a collection of about k images (whole groups drawn at random), its
    whitening fitted on its own codes, evaluated on its own queries."""
    vectors = codes(DEFAULT, names=names, cache=cache)
    groups = sorted({n[:4] for n in names})
    out: list[dict[str, object]] = []
    for k in (50, 100, 150, 200, 300, len(names)):
        rows = []
        for seed in range(seeds if k < len(names) else 1):
            order = np.random.default_rng(seed).permutation(groups)
            chosen: set[str] = set()
            for group in order:
                if sum(n[:4] in chosen for n in names) >= k:
                    break
                chosen.add(str(group))
            keep = [i for i, n in enumerate(names) if n[:4] in chosen]
            part = [names[i] for i in keep]
            part_truth = {q: r for q, r in truth.items() if q[:4] in chosen}
            rows.append(settings_of(vectors[keep], names=part, truth=part_truth) | {"n": len(keep)})
        mean = {key: round(float(np.mean([r[key] for r in rows])), 4) for key in rows[0]}
        helped = sum(r["whiten128"] > r["plain"] for r in rows)
        out.append({"k": k, **mean, "whitening_helped": f"{helped}/{len(rows)}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=["halves", "enough", "collections"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-photo-codes"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--embedder", action="append", help="halves: these specs instead of the four")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    truth = json.loads((ROOT / "groundtruth.json").read_text())
    names = sorted(p.name for p in (ROOT / "jpg").glob("*.jpg"))
    study: Callable[..., list[dict[str, object]]] = {
        "halves": halves,
        "enough": enough,
        "collections": collections,
    }[args.study]
    extra = {"configs": tuple(args.embedder)} if args.embedder and args.study == "halves" else {}
    rows = study(names=names, truth=truth, cache=args.cache, **extra)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        print(json.dumps({"study": args.study, "rows": rows}))


if __name__ == "__main__":
    main()
