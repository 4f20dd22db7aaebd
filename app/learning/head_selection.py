"""Whether a CNN head beats the codes a photo collection serves, on its own held-out labels.

``cbir train classifier --arch head`` offers the head as a candidate against the codes the
collection already serves (the pretrained CNN's, whitened when the collection is whitened, or
a head trained before), by the protocol of ``app.learning.candidates`` (docs/selection.md): a
stratified held-out part of the labelled images are the queries, the other labelled images the
database, same label = relevant, scored by ``index.metrics.evaluate_retrieval`` (what ``cbir
eval`` uses); the head trains on the database part only. The head is served only when its
(P@10 + mAP@all) / 2 is higher; otherwise it is kept as a checkpoint that is not active.
The table is recorded in the head checkpoint's ``metrics["selection"]`` in the rows of
``candidates.Selection.summary``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.context import AppContext
from app.data.records import CheckpointRecord, CollectionRecord
from app.data.vector_rows import load_vectors
from app.learning.candidates import MIN_CLASSES, Split, score, split_held_out
from index.metrics import evaluate_retrieval

HELD_FRACTION = 0.1  # as the pixel selection: 10 % of every label, at least one image each
MAX_HELD = 2000
# Photo collections are often groups of a few views of one scene (INRIA Holidays: 2 to 5 per
# group): one image of every label with two or more is a query, the rest of its label is found.
MIN_PER_CLASS = 2
RULE = "(P@10 + mAP@all) / 2"


def head_split(labels: np.ndarray, *, seed: int) -> Split | None:
    """``labels`` int (n,), -1 = unlabelled -> the held-out split, or None when fewer than
    ``MIN_CLASSES`` labels have ``MIN_PER_CLASS`` images."""
    return split_held_out(
        labels, held_fraction=HELD_FRACTION, max_held=MAX_HELD, seed=seed, min_per_class=MIN_PER_CLASS
    )


def too_few_labels() -> str:
    return f"not validated: fewer than {MIN_CLASSES} labels have {MIN_PER_CLASS} or more images"


def served_codes(
    ctx: AppContext, *, record: CollectionRecord, ids: np.ndarray
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The stored vectors the collection serves, one row per id ((n, d) float32 unit rows, or None
    when any id lacks one), and how to name them in the table (name, kind, notes)."""
    described = _describe_served(ctx, record=record)
    if record.embedder_version is None:
        return None, described
    vectors, stored = load_vectors(ctx.db, collection_id=record.id, embedder_version=record.embedder_version)
    at = {int(i): row for row, i in enumerate(stored)}
    rows = [at.get(int(i)) for i in ids]
    if any(row is None for row in rows):
        return None, described
    return np.ascontiguousarray(vectors[np.asarray(rows, dtype=np.int64)], dtype=np.float32), described


def _describe_served(ctx: AppContext, *, record: CollectionRecord) -> dict[str, Any]:
    active = None
    if record.checkpoint_id is not None:
        with ctx.db.session() as session:
            active = session.get(CheckpointRecord, record.checkpoint_id)
    config = (active.config or {}) if active is not None else {}
    note = f"the codes the collection serves ({record.embedder}, version {record.embedder_version})"
    if config.get("kind") == "whitening":
        return {"name": f"cnn+whiten{config.get('dim')}", "kind": "baseline", "notes": note}
    if config.get("arch") == "head":
        return {
            "name": "served-head",
            "kind": "supervised",
            "notes": note + "; trained on labels that include the held-out images: optimistic figures",
        }
    return {"name": "cnn", "kind": "baseline", "notes": note}


def measure(vectors: np.ndarray, *, labels: np.ndarray, split: Split) -> dict[str, float]:
    """P@10 and mAP@all of the held-out rows of ``vectors`` (n, d) float32 unit rows, ranked
    against the database rows; ``labels`` int (n,)."""
    found = evaluate_retrieval(
        query_vectors=vectors[split.held],
        query_labels=labels[split.held],
        db_vectors=vectors[split.database],
        db_labels=labels[split.database],
        k=min(10, len(split.database)),
    )
    return {"p_at_10": round(float(found["p_at_10"]), 4), "map_all": round(float(found["map_all"]), 4)}


def _row(name: str, kind: str, *, stage: str, figures: dict[str, Any], **rest: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "stage": stage,
        "p_at_10": figures.get("p_at_10"),
        "map_all": figures.get("map_all"),
        "epochs": int(rest.get("epochs", 0)),
        "images": int(rest.get("images", 0)),
        "seconds": round(float(rest.get("seconds", 0.0)), 1),
        "chosen": False,
        "notes": str(rest.get("notes", "")),
    }


def compare(
    *,
    served: np.ndarray,
    described: dict[str, Any],
    head: np.ndarray,
    labels: np.ndarray,
    split: Split,
    head_fit: dict[str, Any],
    served_version: str | None,
    activate: bool,
) -> dict[str, Any]:
    """The selection summary (``candidates.Selection.summary``'s keys, plus ``activated`` and
    ``served_version``) of the served codes against the head's, both (n, d) float32 unit rows
    aligned with ``labels``. ``head_fit``: epochs, images, seconds of the head's training."""
    served_row = _row(
        described["name"],
        described["kind"],
        stage="baseline",
        figures=measure(served, labels=labels, split=split),
        notes=described["notes"],
    )
    head_row = _row(
        "head",
        "supervised",
        stage="full",
        figures=measure(head, labels=labels, split=split),
        notes=f"trained on the {len(split.database)} labelled images not held out",
        **head_fit,
    )
    # Ties go to the served codes: switching costs a re-index and gains nothing measured.
    wins = score(head_row) > score(served_row)
    chosen = head_row if wins else served_row
    chosen["chosen"] = True
    chosen["notes"] += f"; chosen: best held-out {RULE}"
    reason = (
        f"{len(split.held)} held-out labelled images (stratified, {HELD_FRACTION:.0%} per label with "
        f"{MIN_PER_CLASS} or more images, at least one each, at most {MAX_HELD}) ranked against the "
        f"other {len(split.database)} labelled images; the head trained on those only; the served "
        f"codes and the head compared by {RULE}"
    )
    if not wins:
        reason += "; the head is kept as a checkpoint, not activated: the served codes score as well or more"
    elif not activate:
        reason += "; the head scores better but was only recorded (--no-activate)"
    return {
        "winner": chosen["name"],
        "validated": True,
        "reason": reason,
        "held_out": len(split.held),
        "database": len(split.database),
        "table": [served_row, head_row],
        "activated": wins and activate,
        "served_version": served_version,
    }


def unvalidated(
    *, reason: str, head_fit: dict[str, Any], served_version: str | None, activate: bool
) -> dict[str, Any]:
    """The summary of a head trained on every labelled image without a held-out check."""
    row = _row(
        "head",
        "supervised",
        stage="full",
        figures={},
        notes="trained on every labelled image, not measured",
        **head_fit,
    )
    row["chosen"] = activate
    return {
        "winner": "head",
        "validated": False,
        "reason": reason,
        "held_out": 0,
        "database": 0,
        "table": [row],
        "activated": activate,
        "served_version": served_version,
    }
