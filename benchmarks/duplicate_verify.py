"""Can a local-feature verification stage after CNN-code candidates separate altered copies from
other shots of the same scene? Measured on the duplicates bench protocol (INRIA Holidays dev).

Protocol (as ``benchmarks/duplicate_threshold.py sweep``): per half of the Holidays groups, every
photo of the half is an original, a sample of 100 (seed) gets one copy per alteration
(``app.bench.alterations``, standard strength); pairs are predicted when both images fall in one
connected component of the accepted pairs; pair precision / recall over all pairs.

Stages:

1. candidates: raw efficientnet_lite0 cosine >= --candidate (codes from the threshold script's
   cache, /tmp/cbir-dup-cache);
2. verification of each candidate pair, on grey images at their stored size:
   - ``sift``: OpenCV SIFT, ratio-test matches (0.8), RANSAC similarity model
     (``cv2.estimateAffinePartial2D``, 3 px reprojection threshold in the larger image's pixels),
     also against the mirrored image (for a flip), the better of the two kept; features: inlier
     count, inlier ratio (inliers / matches), scale, rotation, median residual, and the inliers of
     a homography for comparison;
   - ``blocks``: the second image warped onto the first with that similarity, both at 256 px
     width; normalised cross-correlation per 32 px block over the blocks inside both images; the
     score is the share of textured blocks with NCC >= 0.8 (copies: nearly all; other shots:
     blocks that moved).
3. a rule ``inliers >= N and ratio >= r`` (sift) or ``blocks >= b`` chosen on one half of the
   groups (best recall at precision >= 0.99), checked on the other.

    python benchmarks/duplicate_verify.py features      # per-image SIFT + grey, cached
    python benchmarks/duplicate_verify.py evaluate --json
    python benchmarks/duplicate_verify.py sheet         # top same-scene pairs by verifier score

Per-image features are cached under --cache (one .npz per image and kind), pair verdicts in
pairs.json there.
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

from app.bench.alterations import ALTERATIONS, alter, encode
from benchmarks.duplicate_threshold import (
    DEFAULT,
    HALVES,
    ROOT,
    _decode,
    codes,
    first_of_each_content,
    groups_of,
)

KINDS = ("original", *ALTERATIONS)
RATIO = 0.8
SIM_PX = 3.0
BLOCK_WIDTH = 256
BLOCK = 32
NCC_OK = 0.8


def _grey(kind: str, row: int, names: list[str]) -> np.ndarray:
    image = _decode((ROOT / names[row]).read_bytes())
    if kind != "original":
        image = _decode(encode(alter(image, name=kind, strength="standard")))
    return np.asarray(image.convert("L"))


def _sift(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sift = cv2.SIFT_create(nfeatures=1500)
    keypoints, desc = sift.detectAndCompute(grey, None)
    pts = np.asarray([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    if desc is None:
        desc = np.zeros((0, 128), np.float32)
    # RootSIFT
    desc = desc / np.maximum(desc.sum(1, keepdims=True), 1e-7)
    return pts, np.sqrt(desc).astype(np.float32)


def feature_path(cache: Path, kind: str, row: int) -> Path:
    return cache / kind / f"{row}.npz"


def build_features(names: list[str], rows: list[int], cache: Path) -> None:
    started = time.perf_counter()
    done = 0
    for row in rows:
        for kind in KINDS:
            path = feature_path(cache, kind, row)
            if path.is_file():
                continue
            grey = _grey(kind, row, names)
            pts, desc = _sift(grey)
            mpts, mdesc = _sift(np.ascontiguousarray(grey[:, ::-1]))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, grey=grey, pts=pts, desc=desc, mpts=mpts, mdesc=mdesc)
            done += 1
    print(f"features: {done} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)


class Features:
    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.memo: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def __call__(self, kind: str, row: int) -> dict[str, np.ndarray]:
        key = (kind, row)
        if key not in self.memo:
            with np.load(feature_path(self.cache, kind, row)) as archive:
                self.memo[key] = {k: archive[k] for k in archive.files}
        return self.memo[key]


def _match(da: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratio-test nearest neighbours of a's descriptors among b's (unit RootSIFT: one matmul)."""
    if len(da) < 2 or len(db) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sims = da @ db.T
    rows = np.arange(len(da))
    nearest = sims.argmax(1)
    best = sims[rows, nearest].copy()
    sims[rows, nearest] = -2.0
    second = sims.max(1)
    d1 = np.sqrt(np.maximum(2 - 2 * best, 0))
    d2 = np.sqrt(np.maximum(2 - 2 * second, 0))
    ia = np.flatnonzero(d1 < RATIO * d2)
    return ia, nearest[ia]


def _structure(src: np.ndarray, dst: np.ndarray, residuals: np.ndarray) -> tuple[float, float]:
    """How structured the similarity's residuals are, on its inliers: (coherence, h_gain).

    coherence: mean cosine between an inlier's residual vector and its nearest inlier's (a copy's
    residuals are keypoint noise, ~0; another shot's are a smooth parallax / perspective field);
    h_gain: 1 - median residual of a least-squares homography / the similarity's.
    """
    if len(src) < 8:
        return 1.0, 1.0
    from scipy.spatial import cKDTree

    # the nearest inlier at least 2 px away (SIFT puts several orientations on one point)
    dist, nn = cKDTree(dst).query(dst, k=min(16, len(dst)))
    far = dist >= 2.0
    has = far.any(1)
    pick = nn[np.arange(len(dst)), far.argmax(1)]
    r, rn = residuals[has], residuals[pick[has]]
    cos = np.sum(r * rn, axis=1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(rn, axis=1) + 1e-9)
    hom, _ = cv2.findHomography(src, dst, 0)
    coherence = float(cos.mean()) if len(cos) else 0.0
    if hom is None:
        return coherence, 0.0
    proj = cv2.perspectiveTransform(src.reshape(-1, 1, 2).astype(np.float64), hom).reshape(-1, 2)
    res_h = float(np.median(np.linalg.norm(proj - dst, axis=1)))
    res_s = float(np.median(np.linalg.norm(residuals, axis=1)))
    return coherence, 1.0 - res_h / max(res_s, 1e-9)


def verify(fa: dict[str, np.ndarray], fb: dict[str, np.ndarray]) -> dict[str, float]:
    """SIFT + similarity RANSAC of b onto a, plain and mirrored b; the better (more inliers)."""
    best: dict[str, float] = {
        "inliers": 0,
        "matches": 0,
        "ratio": 0.0,
        "scale": 0.0,
        "angle": 0.0,
        "residual": 99.0,
        "h_inliers": 0,
        "mirror": 0,
        "M": [0.0] * 6,
        "coherence": 1.0,
        "h_gain": 0.0,
    }
    wa = fa["grey"].shape[1]
    wb = fb["grey"].shape[1]
    # threshold in the larger image's pixels: map the smaller onto the larger
    for mirror, (pb, db) in enumerate(((fb["pts"], fb["desc"]), (fb["mpts"], fb["mdesc"]))):
        ia, ib = _match(fa["desc"], db)
        if len(ia) < 4:
            continue
        src, dst = pb[ib], fa["pts"][ia]
        swap = wb > wa
        if swap:
            src, dst = dst, src
        model, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=SIM_PX, maxIters=2000, confidence=0.995
        )
        if model is None:
            continue
        inl = mask.ravel().astype(bool)
        n = int(inl.sum())
        if n <= best["inliers"]:
            continue
        proj = src @ model[:, :2].T + model[:, 2]
        resid = np.linalg.norm(proj - dst, axis=1)[inl]
        scale = float(np.hypot(model[0, 0], model[1, 0]))
        angle = float(np.degrees(np.arctan2(model[1, 0], model[0, 0])))
        hom, hmask = cv2.findHomography(src, dst, cv2.RANSAC, SIM_PX)
        coherence, h_gain = _structure(src[inl], dst[inl], (proj - dst)[inl])
        if swap:  # keep M as the map of b onto a
            model = cv2.invertAffineTransform(model)
        best = {
            "coherence": coherence,
            "h_gain": h_gain,
            "inliers": n,
            "matches": len(ia),
            "ratio": n / len(ia),
            "scale": scale if not swap else 1 / max(scale, 1e-9),
            "angle": angle,
            "residual": float(np.median(resid)) if n else 99.0,
            "h_inliers": int(hmask.sum()) if hmask is not None else 0,
            "mirror": mirror,
            "M": [float(v) for v in model.ravel()],
        }
    return best


def block_score(fa: dict[str, np.ndarray], fb: dict[str, np.ndarray], v: dict) -> float:
    """Share of textured blocks (of a, at 256 px width) whose NCC with warped b is >= NCC_OK."""
    if v["inliers"] < 4:
        return 0.0
    ga = fa["grey"].astype(np.float32)
    gb = fb["grey"].astype(np.float32)
    if v["mirror"]:
        gb = np.ascontiguousarray(gb[:, ::-1])
    M = np.asarray(v["M"], np.float64).reshape(2, 3)  # b (possibly mirrored) -> a pixels
    s = BLOCK_WIDTH / ga.shape[1]
    S = np.diag([s, s, 1.0])
    Mfull = S @ np.vstack([M, [0, 0, 1]])
    h = round(ga.shape[0] * s)
    a_small = cv2.resize(ga, (BLOCK_WIDTH, h), interpolation=cv2.INTER_AREA)
    b_warp = cv2.warpAffine(gb, Mfull[:2], (BLOCK_WIDTH, h), flags=cv2.INTER_AREA)
    valid = cv2.warpAffine(np.ones_like(gb), Mfull[:2], (BLOCK_WIDTH, h), flags=cv2.INTER_NEAREST)
    ok = total = 0
    for y in range(0, h - BLOCK + 1, BLOCK):
        for x in range(0, BLOCK_WIDTH - BLOCK + 1, BLOCK):
            if valid[y : y + BLOCK, x : x + BLOCK].min() < 1:
                continue
            pa = a_small[y : y + BLOCK, x : x + BLOCK].ravel()
            pb = b_warp[y : y + BLOCK, x : x + BLOCK].ravel()
            if pa.std() < 4 and pb.std() < 4:
                continue  # flat in both: says nothing
            total += 1
            pa = pa - pa.mean()
            pb = pb - pb.mean()
            ncc = float(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb) + 1e-6))
            ok += ncc >= NCC_OK
    return ok / total if total else 0.0


def image_size(kind: str, row: int, names: list[str]) -> tuple[int, int]:
    """(width, height) of an original or its standard-strength copy, as stored."""
    with Image.open(ROOT / names[row]) as image:
        w, h = image.size
    if kind == "half":
        return max(1, round(w * 0.5)), max(1, round(h * 0.5))
    if kind == "crop80":
        return round(w * 0.8), round(h * 0.8)
    return w, h


def containment(verdict: dict, size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """How much one frame lies inside the other under the similarity: max over the two images of
    the share of its area inside the other's frame (a copy: ~1, rotate5 ~0.9; a reframed shot: less)."""
    if verdict["inliers"] < 4:
        return 0.0
    M = np.asarray(verdict["M"], np.float64).reshape(2, 3)
    (wa, ha), (wb, hb) = size_a, size_b
    frame_a = np.asarray([[0, 0], [wa, 0], [wa, ha], [0, ha]], np.float32)
    frame_b = np.asarray([[0, 0], [wb, 0], [wb, hb], [0, hb]], np.float64)
    b_in_a = (frame_b @ M[:, :2].T + M[:, 2]).astype(np.float32)
    inter, _ = cv2.intersectConvexConvex(frame_a, b_in_a)
    return float(max(inter / (wa * ha), inter / max(cv2.contourArea(b_in_a), 1e-9)))


def accepts(verdict: dict, rule: dict[str, float]) -> bool:
    """Every ``key: t`` of the rule holds: verdict[key] >= t, or <= t for a key ``max_<name>``."""
    return all(verdict[k[4:]] <= t if k.startswith("max_") else verdict[k] >= t for k, t in rule.items())


FEATURES = ("inliers", "ratio", "residual", "h_inliers", "blocks", "coherence", "h_gain", "contain")


def learned(runs: dict, half_names: list[str], seeds: int) -> list[dict]:
    """A ceiling for any rule on these features: gradient-boosted trees on the candidate pairs'
    features and cosine (same family or not), trained on one half of the groups, the probability
    threshold chosen there (best recall at precision >= 0.99), checked on the other half."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    def matrix(run: dict) -> np.ndarray:
        rows = [
            [v[f] for f in FEATURES] + [abs(np.log(max(v["scale"], 1e-3))), abs(v["angle"])]
            for v in run["rows"]
        ]
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
            key = f"{ka}:{ra}|{kb}:{rb}"
            if key in verdicts:
                continue
            t0 = time.perf_counter()
            fa, fb = feats(ka, ra), feats(kb, rb)
            v = verify(fa, fb)
            t1 = time.perf_counter()
            v["blocks"] = block_score(fa, fb, v)
            t2 = time.perf_counter()
            v["t_sift"], v["t_blocks"] = t1 - t0, t2 - t1
            verdicts[key] = v
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
    for feat in (*FEATURES, "structured"):
        pos, neg = [], []
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
    one verdict per pair of photos (the best over the candidate pairs of their copies), drawn as
    the two originals."""
    from PIL import ImageDraw

    seen: dict[str, tuple[float, tuple, tuple, dict]] = {}
    for run in runs.values():
        for i, j, v, neg in zip(run["left"], run["right"], run["rows"], run["same_scene"], strict=True):
            if neg:
                a, b = sorted((run["items"][i][1], run["items"][j][1]))
                if f"{a}|{b}" not in seen or v[key] > seen[f"{a}|{b}"][0]:
                    seen[f"{a}|{b}"] = (v[key], ("original", a), ("original", b), v)
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
            f"{names[a[1]][:6]}/{names[b[1]][:6]} inl {v['inliers']} r {v['ratio']:.2f} "
            f"res {v['residual']:.2f} bl {v['blocks']:.2f}",
            fill=0,
        )
        print(
            f"sheet {n}: {names[a[1]]} {names[b[1]]} "
            + " ".join(f"{k} {v[k]:.3f}" for k in ("inliers", "ratio", "residual", "blocks")),
            file=sys.stderr,
        )
    sheet.save(path)


if __name__ == "__main__":
    main()
