"""Can a local-feature verification stage after CNN-code candidates separate altered copies from
other shots of the same scene? Measured on the duplicates bench protocol (INRIA Holidays dev).

Protocol (as ``benchmarks/duplicate_threshold.py sweep``): per half of the Holidays groups, every
photo of the half is an original, a sample of 100 (seed) gets one copy per alteration
(``app.bench.alterations``, standard strength); pairs are predicted when both images fall in one
connected component of the accepted pairs; pair precision / recall over all pairs.

Stages:

1. candidates: raw efficientnet_lite0 cosine >= --candidate (0.70: 99.9 % of the true pairs;
   codes from the threshold script's cache, /tmp/cbir-dup-cache);
2. verification of each candidate pair, on grey images at their stored size (400 px wide):
   - ``sift``: OpenCV SIFT (1500 features, RootSIFT), ratio-test matches (0.8), RANSAC similarity
     (``cv2.estimateAffinePartial2D``, 3 px in the larger image's pixels), also against the
     mirrored image (for a flip), the one with more inliers kept. Verdict: inliers, ratio
     (inliers / matches), scale, angle, median residual, the inliers of a RANSAC homography;
     ``coherence`` (mean cosine between an inlier's residual vector and its nearest inlier's: a
     copy's residuals are keypoint noise, another shot's a parallax field), ``h_gain`` (residual
     drop under a least-squares homography), ``contain`` (share of one frame inside the other);
     ``structured`` = residual x max(coherence, 0), ``*_px``: divided by the zoom between them;
   - ``blocks``: the second image warped onto the first with that similarity, at 256 px width;
     the share of textured 32 px blocks with normalised cross-correlation >= 0.8.
3. rules (``key >= t``, ``max_key: key <= t``) on a grid, the one with the best recall at
   precision >= 0.99 (both seeds) chosen on one half of the groups and checked on the other; and
   ``learned``: gradient-boosted trees on the verdict's features (not scale or angle), a ceiling.

    python benchmarks/duplicate_verify.py features --part 0 & ... --part 1   # per-image SIFT
    python benchmarks/duplicate_verify.py pairs --part 0 & ... --part 1      # candidate verdicts
    python benchmarks/duplicate_verify.py evaluate --json --sheet /tmp/dupverify_hard.png \
        --sheet-by max_structured   # table, distributions, the hardest same-scene pairs

Per-image features are cached under --cache (one .npz per image and kind), verdicts in
pairs-<part>.json there (``pairs --gate``: recomputed for those passing a loose SIFT gate into
extras-<part>.json, which evaluate prefers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from app.bench.alterations import ALTERATIONS
from benchmarks.duplicate_threshold import (
    DEFAULT,
    HALVES,
    ROOT,
    codes,
    first_of_each_content,
    groups_of,
)
from benchmarks.duplicate_verify_pairs import (
    Features,
    block_score,
    build_features,
    containment,
    image_size,
    verify,
)


def accepts(verdict: dict, rule: dict[str, float]) -> bool:
    """Every ``key: t`` of the rule holds: verdict[key] >= t, or <= t for a key ``max_<name>``."""
    return all(verdict[k[4:]] <= t if k.startswith("max_") else verdict[k] >= t for k, t in rule.items())


FEATURES = ("inliers", "ratio", "residual", "h_inliers", "blocks", "coherence", "h_gain", "contain")


def learned(runs: dict, half_names: list[str], seeds: int) -> list[dict]:
    """A ceiling for any rule on these features: gradient-boosted trees on the candidate pairs'
    features and cosine (same family or not; not the transform's scale or angle, which on this
    bench take the alterations' exact values), trained on one half of the groups, the probability
    threshold chosen there (best recall at precision >= 0.99), checked on the other half."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    def matrix(run: dict) -> np.ndarray:
        rows = [[v[f] for f in FEATURES] for v in run["rows"]]
        return np.column_stack([np.asarray(rows, np.float64), run["sims"]])

    def labels(run: dict) -> np.ndarray:
        return run["family"][run["left"]] == run["family"][run["right"]]

    out = []
    for tune, check in ((half_names[0], half_names[1]), (half_names[1], half_names[0])):
        x = np.concatenate([matrix(runs[(tune, s)]) for s in range(seeds)])
        y = np.concatenate([labels(runs[(tune, s)]) for s in range(seeds)])
        model = HistGradientBoostingClassifier(max_iter=200, random_state=0).fit(x, y)
        proba = {
            (h, s): model.predict_proba(matrix(runs[(h, s)]))[:, 1]
            for h in (tune, check)
            for s in range(seeds)
        }

        def score(half: str, seed: int, t: float, proba: dict = proba) -> dict:
            run, keep = runs[(half, seed)], proba[(half, seed)] >= t
            return components_score(
                run["n"], run["left"][keep], run["right"][keep], run["family"], run["kinds"]
            )

        best = (False, 0.0), 0.5
        for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999):
            res = [score(tune, s, t) for s in range(seeds)]
            p, r = min(x["P"] for x in res), min(x["R"] for x in res)
            best = max(best, ((p >= 0.99, r if p >= 0.99 else p), t))
        for half in (tune, check):
            for s in range(seeds):
                r = score(half, s, best[1])
                out.append(
                    {
                        "method": "learned",
                        "rule": f"p>={best[1]}",
                        "tuned_on": tune,
                        "half": half,
                        "seed": s,
                        "P": round(r["P"], 4),
                        "R": round(r["R"], 4),
                        "per": {k: round(v, 3) for k, v in r["per"].items()},
                    }
                )
    return out


def protocol(names: list[str], half: str, seed: int, sample: int = 100):  # type: ignore[no-untyped-def]
    groups = groups_of(names)
    first = first_of_each_content(names)
    keep = np.flatnonzero(np.isin(groups, list(HALVES[half])) & first)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(keep, size=min(sample, len(keep)), replace=False)
    items = [("original", int(r)) for r in keep]
    for alteration in ALTERATIONS:
        items += [(alteration, int(r)) for r in chosen]
    return items


def components_score(n: int, left, right, family, kinds) -> dict:  # type: ignore[no-untyped-def]
    graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)

    def within(labels: np.ndarray) -> int:
        _, sizes = np.unique(labels, return_counts=True)
        return int((sizes * (sizes - 1) // 2).sum())

    both = comp.astype(np.int64) * (family.max() + 1) + family
    tp, pred, true = within(both), within(comp), within(family)
    orig_comp = {int(f): int(c) for f, c, k in zip(family, comp, kinds, strict=True) if k == "original"}
    per = {}
    for alteration in ALTERATIONS:
        idx = [i for i, k in enumerate(kinds) if k == alteration]
        per[alteration] = float(np.mean([comp[i] == orig_comp[int(family[i])] for i in idx]))
    return {"P": tp / pred if pred else 1.0, "R": tp / true, "per": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=["features", "pairs", "evaluate", "sheet"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cbir-dupverify"))
    parser.add_argument("--candidate", type=float, default=0.70)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--part", type=int, default=0, help="features, pairs: this part of 2")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gate", action="store_true", help="pairs: only those a loose SIFT gate passes")
    parser.add_argument("--sheet", type=Path, default=None, help="evaluate: write a contact sheet PNG here")
    parser.add_argument("--sheet-by", default="inliers", help="the verdict key the sheet ranks by")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cv2.setRNGSeed(0)
    names = sorted(p.name for p in ROOT.glob("*.jpg"))
    if args.study == "features":
        build_features(names, list(range(args.part, len(names), 2)), args.cache)
        return
    data = codes(DEFAULT, strength="standard", cache=Path("/tmp/cbir-dup-cache"))
    feats = Features(args.cache)
    runs_items = {(h, s): protocol(names, h, s) for h in HALVES for s in range(args.seeds)}
    candidates = {}
    for key, items in runs_items.items():
        vectors = np.stack([data[k][r] for k, r in items])
        sims = vectors @ vectors.T
        left, right = np.nonzero(np.triu(sims >= args.candidate, k=1))
        candidates[key] = (left, right, sims[left, right])
    if args.study == "pairs":
        unique = sorted(
            {
                (runs_items[key][i], runs_items[key][j])
                for key, (left, right, _) in candidates.items()
                for i, j in zip(left.tolist(), right.tolist(), strict=True)
            }
        )
        mine = unique[args.part :: 2]
        path = args.cache / f"pairs-{args.part}.json"
        if args.gate:  # recompute the verdicts of the pairs that pass a loose SIFT gate
            first = json.loads(path.read_text())
            mine = [
                (a, b)
                for a, b in mine
                if first[f"{a[0]}:{a[1]}|{b[0]}:{b[1]}"]["inliers"] >= 20
                and first[f"{a[0]}:{a[1]}|{b[0]}:{b[1]}"]["ratio"] >= 0.6
            ]
            path = args.cache / f"extras-{args.part}.json"
        verdicts: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
        started = time.perf_counter()
        for count, ((ka, ra), (kb, rb)) in enumerate(mine):
            pair_key = f"{ka}:{ra}|{kb}:{rb}"
            if pair_key in verdicts:
                continue
            t0 = time.perf_counter()
            fa, fb = feats(ka, ra), feats(kb, rb)
            v = verify(fa, fb)
            t1 = time.perf_counter()
            v["blocks"] = block_score(fa, fb, v)
            t2 = time.perf_counter()
            v["t_sift"], v["t_blocks"] = t1 - t0, t2 - t1
            verdicts[pair_key] = v
            if count % 2000 == 1999:
                path.write_text(json.dumps(verdicts))
                print(
                    f"{count + 1}/{len(mine)} pairs, {time.perf_counter() - started:.0f} s", file=sys.stderr
                )
        path.write_text(json.dumps(verdicts))
        return
    verdicts = {}
    for pattern in ("pairs-*.json", "extras-*.json"):
        for path in sorted(args.cache.glob(pattern)):
            verdicts.update(json.loads(path.read_text()))
    for verdict in verdicts.values():
        verdict.setdefault("coherence", 1.0)
        verdict.setdefault("h_gain", 1.0)
    runs = {}
    groups = groups_of(names)
    size_memo: dict[tuple[str, int], tuple[int, int]] = {}

    def sizes(kind: str, row: int) -> tuple[int, int]:
        if (kind, row) not in size_memo:
            size_memo[(kind, row)] = image_size(kind, row, names)
        return size_memo[(kind, row)]

    for (half, seed), items in runs_items.items():
        left, right, cand_sims = candidates[(half, seed)]
        rows = [
            verdicts[f"{items[i][0]}:{items[i][1]}|{items[j][0]}:{items[j][1]}"]
            for i, j in zip(left.tolist(), right.tolist(), strict=True)
        ]
        for i, j, v in zip(left.tolist(), right.tolist(), rows, strict=True):
            if "contain" not in v:
                v["contain"] = containment(v, sizes(*items[i]), sizes(*items[j]))
                v["structured"] = v["residual"] * max(v["coherence"], 0.0)
                # in the smaller image's pixels: its keypoints' noise is what the residual measures
                zoom = max(v["scale"], 1 / max(v["scale"], 1e-9))
                v["structured_px"] = v["structured"] / zoom
                v["residual_px"] = v["residual"] / zoom
        family = np.asarray([r for _, r in items])
        kinds = [k for k, _ in items]
        same_scene = groups[family[left]] == groups[family[right]]
        same_family = family[left] == family[right]
        runs[(half, seed)] = {
            "n": len(items),
            "left": left,
            "right": right,
            "rows": rows,
            "family": family,
            "kinds": kinds,
            "same_scene": same_scene & ~same_family,
            "sims": cand_sims,
            "items": items,
        }
        print(f"{half} seed {seed}: {len(left)} candidates", file=sys.stderr)
    verify_seconds = [v.get("t_sift", 0.0) for v in verdicts.values()]
    block_seconds = [v.get("t_blocks", 0.0) for v in verdicts.values()]

    def evaluate(run: dict, rule: dict[str, float]) -> dict:
        keep = np.asarray([accepts(v, rule) for v in run["rows"]], bool)
        return components_score(run["n"], run["left"][keep], run["right"][keep], run["family"], run["kinds"])

    grid = (8, 12, 16, 20, 30, 40, 60, 80, 100, 150)
    rules: dict[str, list[dict[str, float]]] = {
        "candidates only": [{}],
        "sift": [
            {"inliers": n, "ratio": r} for n in grid for r in (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
        ],
        "sift+residual": [
            {"inliers": n, "ratio": r, "max_residual": x}
            for n in (16, 30, 60)
            for r in (0.0, 0.5, 0.8, 0.9)
            for x in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45)
        ],
        "homography": [{"h_inliers": n} for n in grid],
        "blocks": [{"inliers": 8, "blocks": b} for b in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)],
        "sift+blocks": [
            {"inliers": n, "ratio": r, "blocks": b}
            for n in (8, 16, 30)
            for r in (0.0, 0.3, 0.5)
            for b in (0.5, 0.6, 0.7, 0.8, 0.9)
        ],
        "sift+residual_px": [
            {"inliers": n, "ratio": r, "max_residual_px": x, "contain": c}
            for n in (16, 30, 60)
            for r in (0.5, 0.8, 0.9)
            for x in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
            for c in (0.0, 0.85, 0.9, 0.95)
        ],
        "sift+structure_px": [
            {"inliers": n, "ratio": r, "max_structured_px": x, "contain": c}
            for n in (16, 30, 60)
            for r in (0.5, 0.8, 0.9)
            for x in (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.12)
            for c in (0.0, 0.85, 0.9, 0.95)
        ],
        "sift+structure": [
            {"inliers": n, "ratio": r, "max_structured": x, "contain": c}
            for n in (16, 30, 60)
            for r in (0.5, 0.8, 0.9)
            for x in (0.03, 0.05, 0.08, 0.12, 0.2, 99)
            for c in (0.0, 0.85, 0.9, 0.95)
        ],
    }
    table = []
    half_names = list(HALVES)
    for method, options in rules.items():
        for tune, check in ((half_names[0], half_names[1]), (half_names[1], half_names[0])):
            scored = []
            for rule in options:
                res = [evaluate(runs[(tune, s)], rule) for s in range(args.seeds)]
                p = min(r["P"] for r in res)
                rec = min(r["R"] for r in res)
                scored.append(((p >= 0.99, rec if p >= 0.99 else p), rule))
            rule = max(scored, key=lambda t: t[0])[1]
            label = (
                " ".join(f"{k[4:]}<={t}" if k.startswith("max_") else f"{k}>={t}" for k, t in rule.items())
                or "all"
            )
            for half in (tune, check):
                for s in range(args.seeds):
                    r = evaluate(runs[(half, s)], rule)
                    table.append(
                        {
                            "method": method,
                            "rule": label,
                            "tuned_on": tune,
                            "half": half,
                            "seed": s,
                            "P": round(r["P"], 4),
                            "R": round(r["R"], 4),
                            "per": {k: round(v, 3) for k, v in r["per"].items()},
                        }
                    )
    table += learned(runs, half_names, args.seeds)
    out = {
        "candidate": args.candidate,
        "sift_seconds_per_pair": float(np.median(verify_seconds)),
        "blocks_seconds_per_pair": float(np.median(block_seconds)),
        "table": table,
    }
    # distributions: true family pairs vs same-scene other shots among candidates
    dist = {}
    for feat in (*FEATURES, "structured", "structured_px", "residual_px"):
        pos: list[float] = []
        neg: list[float] = []
        for run in runs.values():
            fam = run["family"][run["left"]] == run["family"][run["right"]]
            for v, f, s in zip(run["rows"], fam, run["same_scene"], strict=True):
                (pos if f else neg if s else []).append(v[feat])
        dist[feat] = {
            "copies p01/p05/median": [round(float(np.quantile(pos, q)), 3) for q in (0.01, 0.05, 0.5)],
            "same-scene median/p95/p99/max": [
                round(float(np.quantile(neg, q)), 3) for q in (0.5, 0.95, 0.99, 1.0)
            ],
        }
    out["distributions"] = dist
    for row in table:
        print(
            f"{row['method']:<12} {row['rule']:<36} tuned {row['tuned_on'][7:]} "
            f"on {row['half'][7:]} s{row['seed']}: "
            f"P {row['P']:.4f} R {row['R']:.4f}  " + " ".join(f"{k} {v:.2f}" for k, v in row["per"].items()),
            file=sys.stderr,
        )
    print(json.dumps(dist, indent=1), file=sys.stderr)
    print(
        f"seconds per pair: sift {out['sift_seconds_per_pair']:.4f} "
        f"blocks {out['blocks_seconds_per_pair']:.4f}",
        file=sys.stderr,
    )
    if args.sheet:
        contact_sheet(runs, feats, names, key=args.sheet_by, path=args.sheet)
    if args.json:
        print(json.dumps(out))


def contact_sheet(runs: dict, feats: Features, names: list[str], *, key: str, path: Path) -> None:
    """The 12 same-scene photo pairs (other shots, not copies) with the highest verifier ``key``,
    one verdict per pair of photos (the best over the candidate pairs of them and their copies),
    drawn as the two images of that candidate pair."""
    from PIL import ImageDraw

    # "max_<name>": lower is more copy-like; only pairs with >= 30 inliers and ratio >= 0.8 count
    sign, name = (-1.0, key[4:]) if key.startswith("max_") else (1.0, key)
    seen: dict[str, tuple[float, tuple, tuple, dict]] = {}
    for run in runs.values():
        for i, j, v, neg in zip(run["left"], run["right"], run["rows"], run["same_scene"], strict=True):
            if sign < 0 and not (v["inliers"] >= 30 and v["ratio"] >= 0.8):
                continue
            if neg and np.isfinite(v[name]):
                a, b = sorted((run["items"][i][1], run["items"][j][1]))
                score = sign * v[name]
                if f"{a}|{b}" not in seen or score > seen[f"{a}|{b}"][0]:
                    seen[f"{a}|{b}"] = (score, run["items"][i], run["items"][j], v)
    top = sorted(seen.values(), key=lambda t: -t[0])[:12]
    cell = 200
    sheet = Image.new("L", (3 * (2 * cell + 10), 4 * (cell + 20)), 255)
    draw = ImageDraw.Draw(sheet)
    for n, (_, a, b, v) in enumerate(top):
        x0, y0 = (n % 3) * (2 * cell + 10), (n // 3) * (cell + 20)
        for k, (kind, row) in enumerate((a, b)):
            grey = Image.fromarray(feats(kind, row)["grey"])
            grey.thumbnail((cell - 4, cell - 4))
            sheet.paste(grey, (x0 + k * cell, y0 + 18))
        draw.text(
            (x0, y0 + 2),
            f"{names[a[1]][:6]}:{a[0][:5]}/{names[b[1]][:6]}:{b[0][:5]} "
            f"inl {v['inliers']} r {v['ratio']:.2f} res {v['residual']:.2f} "
            f"st {v.get('structured', 0):.3f} bl {v['blocks']:.2f}",
            fill=0,
        )
        print(
            f"sheet {n}: {names[a[1]]} {a[0]} / {names[b[1]]} {b[0]} "
            + " ".join(
                f"{k} {v[k]:.3f}" for k in ("inliers", "ratio", "residual", "structured", "contain", "blocks")
            ),
            file=sys.stderr,
        )
    sheet.save(path)


if __name__ == "__main__":
    main()
