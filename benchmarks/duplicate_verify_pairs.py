"""The verifier of ``benchmarks/duplicate_verify.py``: per-image SIFT features (cached) and the
verdict on a pair of images (similarity RANSAC, residual structure, aligned blocks, containment).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from app.bench.alterations import ALTERATIONS, alter, encode
from benchmarks.duplicate_threshold import ROOT, _decode

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
    sift = cv2.SIFT_create(nfeatures=1500)  # type: ignore[attr-defined]
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


def verify(fa: dict[str, np.ndarray], fb: dict[str, np.ndarray]) -> dict[str, Any]:
    """SIFT + similarity RANSAC of b onto a, plain and mirrored b; the better (more inliers)."""
    best: dict[str, Any] = {
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
