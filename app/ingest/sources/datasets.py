"""Built-in datasets and IDX files. MNIST is read from the datasets folder, else downloaded with
torchvision; its pixels become PNG members of an import."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.errors import CbirError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASETS = {"mnist": tuple(MNIST_FILES)}


class DatasetUnavailable(CbirError):
    """The dataset is neither on disk nor downloadable."""

    status, code, title = 503, "dataset_unavailable", "Dataset unavailable"


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 image array (rows, cols) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): uint8 images (n, rows, cols) or labels (n,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 8:
        raise ValueError(f"{path} is too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path} is not an unsigned-byte IDX file of 1 or 3 dimensions")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {payload.size} bytes for shape {shape}")
    return payload.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root / "mnist", root / "MNIST" / "raw", root):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(
    split: str, *, datasets_dir: str | Path | None, download_dir: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` ("train" or "test") as (uint8 (n, 28, 28), uint8 labels (n,))."""
    if split not in MNIST_FILES:
        raise ValueError(f"MNIST has splits {sorted(MNIST_FILES)}, not {split!r}")
    image_stem, label_stem = MNIST_FILES[split]
    for folder in (datasets_dir, download_dir):
        if folder is None:
            continue
        root = Path(folder)
        images, labels = _find(root, image_stem), _find(root, label_stem)
        if images and labels:
            return read_idx(images), read_idx(labels)
    try:
        from torchvision.datasets import MNIST

        dataset = MNIST(str(download_dir), train=split == "train", download=True)
    except Exception as exc:  # no network, mirror down: say where to put the files instead
        raise DatasetUnavailable(
            f"MNIST {split} is not in {datasets_dir or download_dir} and could not be downloaded "
            f"({exc}); put the IDX .gz files in <CBIR_DATASETS_DIR>/mnist/"
        ) from exc
    return dataset.data.numpy(), dataset.targets.numpy().astype(np.uint8)


def keep_local_copy(*, datasets_dir: str | Path | None, download_dir: str | Path) -> None:
    """Copy the MNIST files found in ``datasets_dir`` into ``download_dir`` (the data folder), so
    later commands (``cbir eval``) find them without CBIR_DATASETS_DIR, offline."""
    if datasets_dir is None:
        return
    target = Path(download_dir) / "mnist"
    for stem in (name for pair in MNIST_FILES.values() for name in pair):
        source = _find(Path(datasets_dir), stem)
        if source is not None and not (target / source.name).exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / source.name)
