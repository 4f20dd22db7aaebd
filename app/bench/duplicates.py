"""``cbir bench duplicates``: how well the near-duplicate job finds altered copies, against pHash.

From a folder of distinct photos: every photo is an original; a sample of them (``sample``,
drawn with ``seed``) gets one altered copy per alteration (``app.bench.alterations``). Originals
and copies are written to a scratch folder and imported into a fresh collection of a fresh data
folder through the service's own import job (so the collection is tuned as any import tunes it),
then the duplicates job runs on it. Its groups are scored as the user sees them:

- a pair of images is *predicted* a duplicate when both are in one group (a connected component);
- a pair is *true* when both belong to one family (an original and its copies);
- pair precision = true predicted pairs / predicted pairs; pair recall = true predicted pairs /
  true pairs, over all pairs of the folder's images;
- per alteration: the share of copies of that alteration grouped with their original.

The baseline: ``imagehash.phash`` (64 bits) of the same files, a pair where the Hamming distance
is at most ``PHASH_DISTANCE`` (10, imagededup's default for its PHash), grouped into connected
components the same way (``index.pairs.components``).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.bench.alterations import ALTERATIONS, alter, encode
from app.bench.embedding import BenchError
from app.core.settings import Settings
from app.imaging.decode import ImageLimits, decode_image

PHASH_DISTANCE = 10  # imagededup's default max_distance_threshold for PHash
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
HOLIDAYS_FOLDER = Path("inria-holidays-dev") / "jpg"  # under CBIR_DATASETS_DIR
ORIGINAL = "original"
Say = Callable[[str], None]


@dataclass(frozen=True)
class Entry:
    """One file of the scratch folder: which family (original photo) and which alteration."""

    name: str
    family: int
    alteration: str  # ORIGINAL or a key of ALTERATIONS


@dataclass(frozen=True)
class MethodResult:
    name: str
    threshold: float
    pair_precision: float
    pair_recall: float
    seconds: float
    per_alteration: dict[str, float]
    predicted_pairs: int
    true_pairs: int
    groups: int

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "pair_precision": round(self.pair_precision, 4),
            "pair_recall": round(self.pair_recall, 4),
            "seconds": round(self.seconds, 1),
            "per_alteration": {k: round(v, 4) for k, v in self.per_alteration.items()},
            "predicted_pairs": self.predicted_pairs,
            "true_pairs": self.true_pairs,
            "groups": self.groups,
        }


@dataclass
class BenchResult:
    folder: str
    embedder: str
    images: int
    copies: int
    sample: int
    seed: int
    methods: list[MethodResult] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "copies": self.copies,
            "methods": [m.as_json() for m in self.methods],
            "folder": self.folder,
            "embedder": self.embedder,
            "sample": self.sample,
            "seed": self.seed,
            **self.notes,
        }


def default_folder(settings: Settings) -> Path:
    return (settings.datasets_dir or Path("../shared/datasets")) / HOLIDAYS_FOLDER


def photos_in(folder: Path) -> tuple[list[Path], int]:
    """The image files directly in ``folder``, by name, each content once (an import stores
    identical files once: Holidays dev has three pairs); and how many identical files were left out."""
    if not folder.is_dir():
        raise BenchError(f"no folder of photos at {folder}")
    seen: set[str] = set()
    found: list[Path] = []
    skipped = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            skipped += 1
            continue
        seen.add(digest)
        found.append(path)
    if len(found) < 2:
        raise BenchError(f"{folder} holds {len(found)} image files; the benchmark needs at least 2")
    return found, skipped


def make_folder(
    photos: list[Path], *, out: Path, sample: int, seed: int, strength: str = "standard"
) -> list[Entry]:
    """Write every photo (its bytes unchanged) and one copy per alteration of ``sample`` of them
    (drawn with ``seed``) into ``out``, flat; the entries, originals first."""
    out.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []
    for family, path in enumerate(photos):
        name = f"{family:06d}{path.suffix.lower()}"
        (out / name).write_bytes(path.read_bytes())
        entries.append(Entry(name, family, ORIGINAL))
    chosen = np.sort(
        np.random.default_rng(seed).choice(len(photos), size=min(sample, len(photos)), replace=False)
    )
    limits = ImageLimits()
    for family in chosen.tolist():
        image = decode_image(photos[family].read_bytes(), limits=limits).image
        for alteration in ALTERATIONS:
            name = f"{family:06d}-{alteration}.jpg"
            (out / name).write_bytes(encode(alter(image, name=alteration, strength=strength)))
            entries.append(Entry(name, family, alteration))
    return entries


def _pairs_within(labels: np.ndarray) -> int:
    if not len(labels):
        return 0
    _, sizes = np.unique(labels, return_counts=True)
    return int((sizes * (sizes - 1) // 2).sum())


def score_groups(
    entries: list[Entry], *, group_of: dict[str, int], name: str, threshold: float, seconds: float
) -> MethodResult:
    """Pair precision and recall of the groups (``group_of``: entry name -> group number; an entry
    not in it is alone), and per alteration the share of copies grouped with their original."""
    family = np.asarray([e.family for e in entries], dtype=np.int64)
    alone = -1 - np.arange(len(entries), dtype=np.int64)  # distinct negative labels: no group
    group = np.asarray([group_of.get(e.name, int(alone[i])) for i, e in enumerate(entries)], dtype=np.int64)
    both = np.unique(np.stack([group, family], axis=1), axis=0, return_inverse=True)[1].ravel()
    true_positive = _pairs_within(both)
    predicted = _pairs_within(group)
    true = _pairs_within(family)
    original_group = {e.family: group[i] for i, e in enumerate(entries) if e.alteration == ORIGINAL}
    per_alteration: dict[str, float] = {}
    for alteration in ALTERATIONS:
        hits = [
            group[i] == original_group[e.family] for i, e in enumerate(entries) if e.alteration == alteration
        ]
        if hits:
            per_alteration[alteration] = float(np.mean(hits))
    return MethodResult(
        name=name,
        threshold=threshold,
        pair_precision=true_positive / predicted if predicted else 1.0,
        pair_recall=true_positive / true if true else 1.0,
        seconds=seconds,
        per_alteration=per_alteration,
        predicted_pairs=predicted,
        true_pairs=true,
        groups=len({g for g in group.tolist() if g >= 0}),
    )


_POPCOUNT = np.asarray([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def phash_codes(paths: list[Path]) -> np.ndarray:
    """(n,) uint64: ``imagehash.phash`` (8x8 = 64 bits) of each file, decoded as the service does."""
    import imagehash

    limits = ImageLimits()
    out = np.empty(len(paths), dtype=np.uint64)
    for i, path in enumerate(paths):
        bits = imagehash.phash(decode_image(path.read_bytes(), limits=limits).image).hash.ravel()
        out[i] = np.uint64(int("".join("1" if b else "0" for b in bits), 2))
    return out


def hamming_pairs(codes: np.ndarray, *, distance: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i < j) of the 64-bit codes ((n,) uint64) at most ``distance`` bits apart."""
    left, right = [], []
    n = len(codes)
    for start in range(0, n, block):
        rows = codes[start : start + block]
        xor = np.bitwise_xor(rows[:, None], codes[None, :])
        bits = _POPCOUNT[xor.view(np.uint8).reshape(len(rows), n, 8)].sum(axis=2, dtype=np.int64)
        i, j = np.nonzero(bits <= distance)
        i = i + start
        keep = j > i
        left.append(i[keep])
        right.append(j[keep])
    return np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)


def phash_method(entries: list[Entry], *, folder: Path) -> MethodResult:
    """The pHash baseline on the scratch folder's files, grouped like the job's pairs."""
    from index.pairs import Pairs, components

    began = time.perf_counter()
    codes = phash_codes([folder / e.name for e in entries])
    left, right = hamming_pairs(codes, distance=PHASH_DISTANCE)
    ids, group = components(Pairs(left=left, right=right, score=np.ones(len(left), dtype=np.float32)))
    group_of = {entries[int(i)].name: int(g) for i, g in zip(ids, group, strict=True)}
    seconds = time.perf_counter() - began
    return score_groups(
        entries, group_of=group_of, name="phash", threshold=float(PHASH_DISTANCE), seconds=seconds
    )


def _import(ctx: Any, *, collection: str, folder: Path) -> float:
    """The scratch folder imported through the service's import job (tuning included); seconds."""
    from app.ingest.jobs import get_job
    from app.ingest.sources.folder import FolderSource
    from app.learning.job_kinds import job_runner

    began = time.perf_counter()
    runner = job_runner(ctx)
    try:
        source = FolderSource(folder.resolve())
        job_id = runner.create_job(collection=collection, source=source, creator="admin")
        runner.run_import(job_id=job_id, collection=collection, source=source)
    finally:
        runner.shutdown()
    record = get_job(ctx, job_id).record
    if record.state != "succeeded" or record.failed:
        raise BenchError(f"the import of the scratch folder ended {record.state}: {record.failed} failed")
    return time.perf_counter() - began


def _names_of(ctx: Any, *, collection: str) -> dict[int, str]:
    """Image id -> file name in the scratch folder, for the collection's images."""
    from sqlalchemy import select

    from app.catalog.collections import require_collection
    from app.data.records import ImageRecord

    with ctx.db.session() as session:
        record = require_collection(session, collection)
        rows = session.execute(
            select(ImageRecord.id, ImageRecord.original_name).where(ImageRecord.collection_id == record.id)
        ).all()
    return {int(i): Path(str(name)).name for i, name in rows}


def _run_job(ctx: Any, *, collection: str, threshold: float | None) -> tuple[float, dict[str, int], float]:
    """The duplicates job on the collection: (threshold used, file name -> group, seconds)."""
    from app.duplicates.groups import list_groups
    from app.duplicates.job import find_duplicates

    began = time.perf_counter()
    summary = find_duplicates(ctx, collection=collection, threshold=threshold)
    seconds = time.perf_counter() - began
    group_of: dict[str, int] = {}
    page = 1
    while True:
        found = list_groups(ctx, collection=collection, status="all", page=page, per_page=500)
        for group in found.groups:
            for member in group.members:
                group_of[Path(str(member.original_name)).name] = group.id
        if page * 500 >= found.total:
            break
        page += 1
    return float(summary["threshold"]), group_of, seconds


def run_bench(
    settings: Settings,
    *,
    folder: Path,
    sample: int,
    embedder: str,
    threshold: float | None,
    seed: int,
    strength: str = "standard",
    say: Say = lambda _: None,
) -> BenchResult:
    """Originals and copies in a fresh collection of a fresh data folder, the job, the baseline."""
    from app.catalog.collections import create_collection
    from app.context import open_context

    photos, identical = photos_in(folder)
    with tempfile.TemporaryDirectory(prefix="cbir-bench-duplicates-") as scratch:
        files = Path(scratch) / "photos"
        say(f"altering {min(sample, len(photos))} of {len(photos)} photos of {folder}")
        entries = make_folder(photos, out=files, sample=sample, seed=seed, strength=strength)
        ctx = open_context(
            settings.model_copy(update={"data_dir": Path(scratch) / "data", "database_url": ""})
        )
        try:
            create_collection(ctx, name="bench", embedder=embedder)
            say(f"importing {len(entries)} images ({embedder})")
            imported_s = _import(ctx, collection="bench", folder=files)
            say("running the duplicates job")
            used, group_of, job_s = _run_job(ctx, collection="bench", threshold=threshold)
            names = _names_of(ctx, collection="bench")
            codes = _served_version(ctx, collection="bench")
        finally:
            ctx.close()
        if len(names) != len(entries):
            raise BenchError(f"{len(entries)} files imported as {len(names)} images (identical files?)")
        result = BenchResult(
            folder=str(folder),
            embedder=embedder,
            images=len(entries),
            copies=sum(e.alteration != ORIGINAL for e in entries),
            sample=min(sample, len(photos)),
            seed=seed,
            notes={
                "strength": strength,
                "codes": codes,
                "identical_files_skipped": identical,
                "import_seconds": round(imported_s, 1),
            },
        )
        result.methods.append(
            score_groups(entries, group_of=group_of, name=embedder, threshold=used, seconds=job_s)
        )
        say("pHash baseline")
        result.methods.append(phash_method(entries, folder=files))
    return result


def _served_version(ctx: Any, *, collection: str) -> str:
    """The embedder version the collection serves after its import (whitened or not)."""
    from app.catalog.collections import get_collection

    return str(get_collection(ctx, collection).embedder_version)


def format_table(result: BenchResult) -> list[str]:
    alterations = list(ALTERATIONS)
    head = f"{'method':<22} {'threshold':>9} {'precision':>9} {'recall':>7} {'seconds':>8}  " + " ".join(
        f"{a:>9}" for a in alterations
    )
    lines = [
        f"{result.images} images: {result.copies} altered copies of {result.sample} photos "
        f"(seed {result.seed}), codes {result.notes.get('codes')}",
        head,
    ]
    for m in result.methods:
        lines.append(
            f"{m.name:<22} {m.threshold:>9.3f} {m.pair_precision:>9.4f} {m.pair_recall:>7.4f} "
            f"{m.seconds:>8.1f}  "
            + " ".join(f"{m.per_alteration.get(a, float('nan')):>9.3f}" for a in alterations)
        )
    return lines
