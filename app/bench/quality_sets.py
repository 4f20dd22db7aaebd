"""The generalisation suite's data sets: small labelled retrieval tasks built from offline data.

Each set is 28x28 greyscale (the CDAE's and raw pixels' native input) with a database part (what a
collection stores, what an unsupervised model trains on) and a query part (held out), same label
relevant. They change what matters between images, so that a default tuned to one of them shows:

- ``mnist``: handwritten digits (the demo's domain).
- ``mnist-inverted``: the same digits, dark on light: the background is no longer zero.
- ``mnist-thick``: the strokes re-drawn thick and soft (3x3 dilation, then a blur): shape kept,
  stroke texture changed.
- ``mnist-turned``: orientation is the class: digits 0-4 as written, and the same digits turned
  30 degrees clockwise, ten classes (a code invariant to rotation merges them).
- ``digits-8x8``: scikit-learn's bundled 8x8 digits (1,797 images, 16 grey levels), another hand
  and scanner, upsampled to a 20x20 box in a 28x28 frame as MNIST is.
- ``holidays-28``: the INRIA Holidays photos (groups 1000-1149) reduced to a 28x28 grey thumbnail
  of their centre square; each group's query photo against the other photos (INRIA's protocol).
- ``holidays-patches``: six random 28x28 grey crops of each of those photos at 36 px (shorter
  side): natural scenes where orientation matters and nothing is centred; the crops of a group's
  query photo against the crops of its other photos.

Arrays are uint8 (n, 28, 28); labels int64 (n,). Nothing is written anywhere.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 28


@dataclass(frozen=True)
class QualitySet:
    name: str
    db_images: np.ndarray  # uint8 (n, 28, 28): stored, and what unsupervised training sees
    db_labels: np.ndarray  # int64 (n,)
    query_images: np.ndarray  # uint8 (q, 28, 28): held out
    query_labels: np.ndarray  # int64 (q,)
    about: str


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _mnist(root: Path, *, db: int, queries: int) -> tuple[np.ndarray, ...]:
    folder = root / "mnist"
    return (
        _read_idx(folder / "train-images-idx3-ubyte.gz")[:db],
        _read_idx(folder / "train-labels-idx1-ubyte.gz")[:db].astype(np.int64),
        _read_idx(folder / "t10k-images-idx3-ubyte.gz")[:queries],
        _read_idx(folder / "t10k-labels-idx1-ubyte.gz")[:queries].astype(np.int64),
    )


def _thicken(images: np.ndarray) -> np.ndarray:
    """3x3 grey dilation, then a 3x3 binomial blur: thick soft strokes of the same shapes."""
    x = images.astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    dilated = np.max([padded[:, i : i + SIZE, j : j + SIZE] for i in range(3) for j in range(3)], axis=0)
    padded = np.pad(dilated, ((0, 0), (1, 1), (1, 1)), mode="edge")
    kernel = np.array([1.0, 2.0, 1.0]) / 4
    rows = sum(kernel[i] * padded[:, i : i + SIZE, :] for i in range(3))
    blurred = sum(kernel[j] * rows[:, :, j : j + SIZE] for j in range(3))
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def _turned(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digits 0-4; every other one turned 30 degrees clockwise and labelled 5 + digit."""
    keep = labels < 5
    images, labels = images[keep], labels[keep].copy()
    turn = np.arange(len(images)) % 2 == 1
    for i in np.flatnonzero(turn):
        images[i] = np.asarray(Image.fromarray(images[i]).rotate(-30, resample=Image.Resampling.BILINEAR))
    labels[turn] += 5
    return images, labels


def _stratified(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(db indices, query indices): ``fraction`` of every class held out as queries."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held.append(members[: max(1, round(len(members) * fraction))])
    queries = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), queries), queries


def _digits_8x8() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits  # bundled in the wheel: no download
    except ImportError:
        raise ValueError("digits-8x8 needs scikit-learn: pip install 'cbir[bench]'") from None

    digits = load_digits()
    frames = []
    for image in digits.images:
        small = Image.fromarray(np.uint8(np.rint(image * 255 / 16)))
        box = np.asarray(small.resize((20, 20), Image.Resampling.BILINEAR))
        frames.append(np.pad(box, 4))
    images, labels = np.stack(frames), digits.target.astype(np.int64)
    db, queries = _stratified(labels, fraction=0.25, seed=0)
    return images[db], labels[db], images[queries], labels[queries]


def _holidays_photos(root: Path) -> list[tuple[int, bool, Image.Image]]:
    """(group, is the group's query photo, grey image) per Holidays file, in name order."""
    photos = []
    for path in sorted((root / "inria-holidays-dev" / "jpg").glob("*.jpg")):
        with Image.open(path) as image:
            grey = image.convert("L")
        photos.append((int(path.stem) // 100, path.stem.endswith("00"), grey))
    return photos


def _holidays_thumbnails(root: Path) -> tuple[np.ndarray, ...]:
    thumbs, groups, is_query = [], [], []
    for group, query, grey in _holidays_photos(root):
        side = min(grey.size)
        left, top = (grey.width - side) // 2, (grey.height - side) // 2
        square = grey.crop((left, top, left + side, top + side))
        thumbs.append(np.asarray(square.resize((SIZE, SIZE), Image.Resampling.BOX)))
        groups.append(group)
        is_query.append(query)
    return _split_by_role(np.stack(thumbs), np.asarray(groups), np.asarray(is_query))


def _holidays_patches(root: Path, *, per_photo: int = 6, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    patches, groups, is_query = [], [], []
    for group, query, grey in _holidays_photos(root):
        scale = 36 / min(grey.size)
        small = np.asarray(
            grey.resize(
                (max(SIZE, round(grey.width * scale)), max(SIZE, round(grey.height * scale))),
                Image.Resampling.BOX,
            )
        )
        for _ in range(per_photo):
            top = rng.integers(0, small.shape[0] - SIZE + 1)
            left = rng.integers(0, small.shape[1] - SIZE + 1)
            patches.append(small[top : top + SIZE, left : left + SIZE])
            groups.append(group)
            is_query.append(query)
    return _split_by_role(np.stack(patches), np.asarray(groups), np.asarray(is_query))


def _split_by_role(images: np.ndarray, groups: np.ndarray, is_query: np.ndarray) -> tuple[np.ndarray, ...]:
    labels = groups.astype(np.int64)
    return images[~is_query], labels[~is_query], images[is_query], labels[is_query]


def _turned_mnist(root: Path, *, db: int, queries: int) -> tuple[np.ndarray, ...]:
    train_images, train_labels, test_images, test_labels = _mnist(root, db=db, queries=queries)
    return (*_turned(train_images, train_labels), *_turned(test_images, test_labels))


SET_NAMES = (
    "mnist",
    "mnist-inverted",
    "mnist-thick",
    "mnist-turned",
    "digits-8x8",
    "holidays-28",
    "holidays-patches",
)


def load_set(name: str, *, datasets_dir: Path, db: int = 60_000, queries: int = 10_000) -> QualitySet:
    """One data set of the suite; ``db`` and ``queries`` cap the MNIST-based sets (first N)."""
    builders: dict[str, Callable[[], tuple[np.ndarray, ...]]] = {
        "mnist": lambda: _mnist(datasets_dir, db=db, queries=queries),
        "mnist-inverted": lambda: tuple(
            255 - a if a.dtype == np.uint8 else a for a in _mnist(datasets_dir, db=db, queries=queries)
        ),
        "mnist-thick": lambda: tuple(
            _thicken(a) if a.dtype == np.uint8 else a for a in _mnist(datasets_dir, db=db, queries=queries)
        ),
        "mnist-turned": lambda: _turned_mnist(datasets_dir, db=db, queries=queries),
        "digits-8x8": _digits_8x8,
        "holidays-28": lambda: _holidays_thumbnails(datasets_dir),
        "holidays-patches": lambda: _holidays_patches(datasets_dir),
    }
    if name not in builders:
        raise ValueError(f"unknown quality set {name!r}; known: {', '.join(SET_NAMES)}")
    db_images, db_labels, query_images, query_labels = builders[name]()
    about = (__doc__ or "").split(f"``{name}``: ", 1)[-1].split("\n- ")[0].split("\n\n")[0]
    return QualitySet(
        name=name,
        db_images=np.ascontiguousarray(db_images),
        db_labels=db_labels,
        query_images=np.ascontiguousarray(query_images),
        query_labels=query_labels,
        about=" ".join(about.split()),
    )
