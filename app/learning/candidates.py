"""Choosing a collection's embedder on its own labelled images: the array-level core.

No database, no HTTP: uint8 images and integer labels in, a ``Selection`` out. The protocol
(docs/selection.md): a stratified held-out part of the labelled images are the queries, the
other labelled images the database, same label = relevant, scored by
``index.metrics.evaluate_retrieval`` (what ``cbir eval`` uses). No candidate, supervised or not,
trains on a held-out image. Every candidate is screened cheaply (learned ones on a sample, for a
few epochs); the best learned one is then trained fully on every non-held-out image and measured
again; the winner is the best of that full model and the untrained baselines (raw pixels, PCA),
so the served codes are never worse than the baseline on the collection's own held-out part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from index.metrics import evaluate_retrieval
from index.rerank import fit_whitening
from models import cdae, lenet
from models.classifier import get_arch

IMAGE_SIZE = 28  # what the pixels embedder, the CDAE presets and LeNet-5 read
MIN_PER_CLASS = 10  # a class takes part in the held-out split with at least this many images
MIN_CLASSES = 2
PCA_COMPONENTS = 64
PCA_FIT_IMAGES = 20_000  # the covariance of 20,000 rows is as good as of 60,000, at a third of the cost
UNVALIDATED = "not validated: the collection has no labels"

Say = Callable[[str], None]
TrainBars = Callable[[str], Callable[[int, int, int, float], None] | None]  # name -> epoch progress


def l2_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def at_size(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (n, H, W) -> uint8 (n, size, size), resized as the served embedders resize (PIL bilinear)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 (n, H, W) greyscale, got {images.dtype} {images.shape}")
    if images.shape[1:] == (size, size):
        return images
    return np.stack(
        [np.array(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in images]
    ).astype(np.uint8)


@dataclass
class Fitted:
    """A candidate fitted on some images: ``encode`` uint8 (n, 28, 28) -> (n, d) float32 unit rows."""

    name: str
    kind: str  # "baseline" (untrained), "unsupervised" or "supervised"
    encode: Callable[[np.ndarray], np.ndarray]
    artefact: Any = None  # what the service saves: a cdae/lenet TrainResult, a Whitening, or None
    config: dict[str, Any] = field(default_factory=dict)  # JSON: the recipe
    epochs: int = 0
    images: int = 0  # how many images it was fitted on
    seconds: float = 0.0  # fitting time
    row: dict[str, Any] | None = None  # its row of the selection table, once measured


# A candidate's fit: (images uint8 (n, 28, 28), labels int (n,) or None, *, classes, epochs (None:
# the recipe's), device, seed) -> Fitted. Baselines ignore epochs; supervised ones need labels.
Fit = Callable[..., Fitted]


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    fit: Fit
    recipe_epochs: Callable[[int], int] = lambda _images: 0  # its full training's epochs for n images

    @property
    def learned(self) -> bool:
        return self.kind != "baseline"


def _fit_pixels(images: np.ndarray, labels: np.ndarray | None, **_: Any) -> Fitted:
    def encode(x: np.ndarray) -> np.ndarray:
        return l2_rows(at_size(x).reshape(len(x), -1).astype(np.float32) / 255.0)

    return Fitted("pixels", "baseline", encode, config={"size": IMAGE_SIZE})


def _fit_pca(images: np.ndarray, labels: np.ndarray | None, *, seed: int = 0, **_: Any) -> Fitted:
    """PCA of the L2-normalised pixel rows (the pixels embedder's codes), fitted on ``images``.

    Shrinkage 1 makes every kept eigenvalue the same, so the projection is a plain (unwhitened)
    PCA up to one scale, which the final L2 normalisation removes."""
    started = time.perf_counter()
    pixels = _fit_pixels(images, None).encode
    rng = np.random.default_rng(seed)
    sample = (
        images
        if len(images) <= PCA_FIT_IMAGES
        else images[rng.choice(len(images), PCA_FIT_IMAGES, replace=False)]
    )
    rows = pixels(sample)
    dim = min(PCA_COMPONENTS, len(rows) - 1, rows.shape[1])
    whitening = fit_whitening(rows, dim=dim, shrinkage=1.0)

    def encode(x: np.ndarray) -> np.ndarray:
        return whitening.apply(pixels(x))

    return Fitted(
        f"pca{PCA_COMPONENTS}",
        "baseline",
        encode,
        artefact=whitening,
        config={"components": dim, "fitted_on": int(len(rows))},
        images=len(rows),
        seconds=time.perf_counter() - started,
    )


def _torch_encoder(
    fn: Callable[[torch.Tensor], torch.Tensor], *, size: int
) -> Callable[[np.ndarray], np.ndarray]:
    def encode(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            codes = fn(torch.from_numpy(np.array(at_size(x, size))))  # a writable copy
        return l2_rows(codes.float().cpu().numpy())

    return encode


def cdae_candidate(preset: str) -> Candidate:
    """The CDAE of a preset, as ``cbir train cdae --preset`` trains it (unsupervised)."""

    def fit(
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        epochs: int | None = None,
        device: torch.device,
        seed: int = 0,
        progress: Callable[[int, int, int, float], None] | None = None,
        **_: Any,
    ) -> Fitted:
        config = cdae.CDAEConfig.preset(preset)
        epochs = cdae.epochs_for(config, images=len(images), epochs=epochs)
        started = time.perf_counter()
        result = cdae.train_cdae(
            at_size(images, config.image_size),
            config=config,
            epochs=epochs,
            device=device,
            seed=seed,
            progress=progress,
        )

        def codes(x: torch.Tensor) -> torch.Tensor:
            return cdae.embed_uint8(result, x, config=config)  # as the embedder serves them

        return Fitted(
            f"cdae-{preset}",
            "unsupervised",
            _torch_encoder(codes, size=config.image_size),
            artefact=result,
            config={**config.to_dict(), "preset": preset, "epochs": epochs, "seed": seed},
            epochs=epochs,
            images=len(images),
            seconds=time.perf_counter() - started,
        )

    def recipe(images: int) -> int:
        return cdae.epochs_for(cdae.CDAEConfig.preset(preset), images=images)

    return Candidate(f"cdae-{preset}", "unsupervised", fit, recipe)


def classifier_candidate(arch: str = "lenet5") -> Candidate:
    """A classifier arch on pixels, as ``cbir train classifier --arch`` trains it (supervised)."""

    def fit(
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        classes: Sequence[str],
        epochs: int | None = None,
        device: torch.device,
        seed: int = 0,
        progress: Callable[[int, int, int, float], None] | None = None,
        **_: Any,
    ) -> Fitted:
        if labels is None:
            raise ValueError(f"{arch} needs labels")
        spec = get_arch(arch)
        started = time.perf_counter()
        result = spec.train(
            at_size(images),
            labels,
            classes=list(classes),
            epochs=epochs,
            seed=seed,
            device=device,
            progress=progress,
        )
        # LeNet-5 is the one pixel arch so far; its encoder is F6.
        network = result.model  # type: ignore[attr-defined]
        return Fitted(
            arch,
            "supervised",
            _torch_encoder(lambda x: lenet.encode_images(network, x), size=IMAGE_SIZE),
            artefact=result,
            config={**result.recipe, "arch": arch, "preset": spec.preset, "seed": seed},
            epochs=len(result.metrics.get("epoch_losses", [])),
            images=len(images),
            seconds=time.perf_counter() - started,
        )

    return Candidate(arch, "supervised", fit, lambda _images: get_arch(arch).default_epochs)


PIXELS = Candidate("pixels", "baseline", _fit_pixels)
PCA = Candidate(f"pca{PCA_COMPONENTS}", "baseline", _fit_pca)


def default_candidates(*, labelled: bool) -> list[Candidate]:
    """With labels: the baselines, the default CDAE, the strokes CDAE, LeNet-5; without: the default CDAE."""
    if not labelled:
        return [cdae_candidate("default")]
    return [PIXELS, PCA, cdae_candidate("default"), cdae_candidate("strokes"), classifier_candidate("lenet5")]


def score(row: dict[str, Any]) -> float:
    """What the selection ranks by: the mean of P@10 and mAP@all on the held-out queries."""
    return (float(row["p_at_10"]) + float(row["map_all"])) / 2


@dataclass
class Split:
    """Indices into the images: held-out queries, labelled database, everything not held out."""

    held: np.ndarray
    database: np.ndarray
    pool: np.ndarray  # the database plus the unlabelled images: what unsupervised candidates train on


def split_held_out(
    labels: np.ndarray, *, held_fraction: float, max_held: int, seed: int, min_per_class: int = MIN_PER_CLASS
) -> Split | None:
    """A stratified held-out part: ``held_fraction`` of every class with at least ``min_per_class``
    images (at least one each), scaled down to ``max_held`` in all; None when fewer than
    ``MIN_CLASSES`` classes are that large. ``labels`` int (n,), negative = unlabelled."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    eligible = classes[counts >= max(2, min_per_class)]  # one to query, one to find
    if len(eligible) < MIN_CLASSES:
        return None
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in eligible]
    take = np.array([max(1, round(held_fraction * len(m))) for m in members])
    if take.sum() > max_held:
        take = np.maximum(1, np.floor(take * max_held / take.sum())).astype(int)
    held = np.sort(
        np.concatenate([rng.choice(m, t, replace=False) for m, t in zip(members, take, strict=True)])
    )
    rest = np.setdiff1d(np.arange(len(labels)), held)
    return Split(held=held, database=rest[labels[rest] >= 0], pool=rest)


@dataclass
class Selection:
    """The outcome: the table (JSON rows), the winner's name and the winner as served."""

    table: list[dict[str, Any]]
    winner: str
    validated: bool
    reason: str  # the rule that chose, or why nothing was validated
    model: Fitted  # the winner, fitted on every non-held-out image (full epochs)
    kept: list[Fitted]  # every learned model trained on the way (the winner's full one included)
    held_out: int = 0
    database: int = 0

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W) -> (n, d) float32 unit rows under the winner."""
        return self.model.encode(images)

    def summary(self) -> dict[str, Any]:
        """JSON, as recorded with the checkpoint (``metrics["selection"]``)."""
        return {
            "winner": self.winner,
            "validated": self.validated,
            "reason": self.reason,
            "held_out": self.held_out,
            "database": self.database,
            "table": self.table,
        }


def select_embedder(
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    candidates: Sequence[Candidate] | None = None,
    held_fraction: float = 0.1,
    max_held: int = 2000,
    min_per_class: int = MIN_PER_CLASS,
    screen_images: int = 5000,
    screen_epochs: int = 2,
    full_epochs: int | None = None,
    full_budget_s: float | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    progress: Say | None = None,
    train_bars: TrainBars | None = None,
) -> Selection:
    """Choose the embedder of a collection by its own held-out labelled images.

    ``images`` uint8 (n, H, W) greyscale (resized to 28x28 as the served embedders resize),
    ``labels`` int (n,) with negatives for unlabelled images, or None. ``candidates``: by default
    ``default_candidates``. Learned candidates are screened on ``screen_images`` non-held-out
    images for ``screen_epochs``; the best of them is trained on all of them for ``full_epochs``
    (None: its recipe's, fewer when ``full_budget_s`` is given and the rate measured while
    screening says the recipe would take longer) and measured again. Without usable labels the
    default CDAE is trained on every image and the selection says it was not validated.
    """
    device = device or torch.device("cpu")
    say = progress or (lambda _text: None)
    bars = train_bars or (lambda _name: None)
    images = at_size(images)
    split = None
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be (n,) = ({len(images)},), got {labels.shape}")
        split = split_held_out(
            labels, held_fraction=held_fraction, max_held=max_held, seed=seed, min_per_class=min_per_class
        )
    if split is None:
        reason = UNVALIDATED
        if labels is not None and (labels >= 0).any():
            reason = f"not validated: fewer than {MIN_CLASSES} labels have {min_per_class} or more images"
        return _unvalidated(
            images, reason=reason, epochs=full_epochs, seed=seed, device=device, say=say, bars=bars
        )
    assert labels is not None
    pool = list(candidates if candidates is not None else default_candidates(labelled=True))
    classes, coded = np.unique(labels[split.database], return_inverse=True)
    db_codes = np.full(len(labels), -1, dtype=np.int64)
    db_codes[split.database] = coded
    rng = np.random.default_rng(seed)
    sample = (
        split.pool
        if len(split.pool) <= screen_images
        else np.sort(rng.choice(split.pool, screen_images, replace=False))
    )
    labelled = sample if (db_codes[sample] >= 0).all() else rng.permutation(split.database)[:screen_images]
    k = min(10, len(split.database))

    def measure(fitted: Fitted, *, stage: str, started: float, note: str) -> dict[str, Any]:
        found = evaluate_retrieval(
            query_vectors=fitted.encode(images[split.held]),
            query_labels=labels[split.held],
            db_vectors=fitted.encode(images[split.database]),
            db_labels=labels[split.database],
            k=k,
        )
        row = {
            "name": fitted.name,
            "kind": fitted.kind,
            "stage": stage,
            "p_at_10": round(found["p_at_10"], 4),
            "map_all": round(found["map_all"], 4),
            "epochs": fitted.epochs,
            "images": fitted.images,
            "seconds": round(time.perf_counter() - started, 1),
            "chosen": False,
            "notes": note,
        }
        fitted.row = row
        say(
            f"{row['name']} ({stage}): P@10 {row['p_at_10']:.3f}, "
            f"mAP@all {row['map_all']:.3f}, {row['seconds']} s"
        )
        return row

    def fit(candidate: Candidate, rows: np.ndarray, *, epochs: int | None, stage: str) -> Fitted:
        if candidate.kind == "supervised":  # labelled, never held out; the sample may hold no label
            rows = rows[db_codes[rows] >= 0] if stage == "full" else labelled
        return candidate.fit(
            images[rows],
            db_codes[rows] if candidate.kind == "supervised" else None,
            classes=[str(c) for c in classes],
            epochs=epochs,
            device=device,
            seed=seed,
            progress=bars(f"{candidate.name} ({stage})"),
        )

    table: list[dict[str, Any]] = []
    kept: list[Fitted] = []
    screened: list[tuple[dict[str, Any], Candidate, Fitted]] = []
    final: list[tuple[dict[str, Any], Fitted]] = []
    for candidate in pool:
        started = time.perf_counter()
        if not candidate.learned:  # untrained (PCA is fitted on the database part, no labels)
            fitted = candidate.fit(images[split.database], None, seed=seed)
            row = measure(fitted, stage="baseline", started=started, note="untrained baseline")
            final.append((row, fitted))
        else:
            say(f"screening {candidate.name}: {len(sample)} images, {screen_epochs} epochs")
            fitted = fit(candidate, sample, epochs=screen_epochs, stage="screen")
            note = f"screened on {fitted.images} images for {fitted.epochs} epochs"
            row = measure(fitted, stage="screen", started=started, note=note)
            screened.append((row, candidate, fitted))
            kept.append(fitted)
        table.append(row)
    if screened:
        best_row, best, trial = max(screened, key=lambda entry: score(entry[0]))
        rows = split.database if best.kind == "supervised" else split.pool
        epochs = full_epochs
        if epochs is None and full_budget_s is not None:
            epochs = budget_epochs(
                trial, images=len(rows), recipe=best.recipe_epochs(len(rows)), budget_s=full_budget_s
            )
        started = time.perf_counter()
        say(f"training {best.name} fully on {len(rows)} images (best screened learned candidate)")
        fitted = fit(best, split.pool, epochs=epochs, stage="full")
        note = f"best screened, trained on every non-held-out image for {fitted.epochs} epochs"
        if full_epochs is None and fitted.epochs < best.recipe_epochs(len(rows)):
            note += f" (the recipe's {best.recipe_epochs(len(rows))} would not fit {full_budget_s:g} s)"
        row = measure(fitted, stage="full", started=started, note=note)
        table.append(row)
        kept.append(fitted)
        final.append((row, fitted))
    # Ties go to the earlier row: the untrained baselines come first, and they cost nothing to serve.
    win_row, model = max(final, key=lambda pair: score(pair[0]))
    win_row["chosen"] = True
    win_row["notes"] += "; chosen: best held-out (P@10 + mAP@all) / 2"
    return Selection(
        table=table,
        winner=model.name,
        validated=True,
        reason=(
            f"{len(split.held)} held-out labelled images (stratified, {held_fraction:.0%} per label, at most "
            f"{max_held}) ranked against the other {len(split.database)} labelled images; the best of the "
            "baselines and the fully trained best screened candidate by (P@10 + mAP@all) / 2"
        ),
        model=model,
        kept=kept,
        held_out=len(split.held),
        database=len(split.database),
    )


def budget_epochs(trial: Fitted, *, images: int, recipe: int, budget_s: float) -> int:
    """The recipe's epochs, or fewer (at least one) when the seconds per image and epoch that
    ``trial`` (the screening fit) took say the recipe would not fit in ``budget_s``."""
    rate = trial.seconds / max(1, trial.images * trial.epochs)
    fits = int(budget_s // max(rate * images, 1e-9))
    return max(1, min(recipe, fits))


def _unvalidated(
    images: np.ndarray,
    *,
    reason: str,
    epochs: int | None,
    seed: int,
    device: torch.device,
    say: Say,
    bars: TrainBars,
) -> Selection:
    """No usable labels: the default CDAE on every image, recorded as not validated."""
    candidate = cdae_candidate("default")
    say(f"{reason}: training {candidate.name} on {len(images)} images")
    started = time.perf_counter()
    fitted = candidate.fit(
        images, None, epochs=epochs, device=device, seed=seed, progress=bars(candidate.name)
    )
    row = {
        "name": fitted.name,
        "kind": fitted.kind,
        "stage": "full",
        "p_at_10": None,
        "map_all": None,
        "epochs": fitted.epochs,
        "images": fitted.images,
        "seconds": round(time.perf_counter() - started, 1),
        "chosen": True,
        "notes": reason,
    }
    fitted.row = row
    return Selection(
        table=[row], winner=fitted.name, validated=False, reason=reason, model=fitted, kept=[fitted]
    )
