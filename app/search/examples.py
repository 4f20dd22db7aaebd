"""Search by several examples: positive and negative ones (uploads and stored images of the
collection) combined into one query, Rocchio-style, and searched as a single image is.

    q = normalize(positive_weight * mean(p_i) - negative_weight * mean(n_j))

over the L2-normalised codes of the examples (the collection's codes: after its whitening when it
has one). The stored examples are left out of the hits; filters, ``k``, query expansion and the
index's search parameters apply to ``q`` exactly as to a single query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.catalog.filters import ImageFilter
from app.context import AppContext
from app.core.errors import CbirError, InvalidRequest
from app.data.records import CollectionRecord
from app.embedding.codes import degenerate_codes
from app.search.query import (
    Clock,
    SearchResult,
    check_k,
    hits_of,
    prepare,
    ranked,
    rows_of,
    served_collection,
    stored_codes,
)
from index import SearchKnobs

MAX_EXAMPLES = 16  # positives and negatives together
# Defaults measured on Holidays (efficientnet_lite0) and MNIST (the demo's CDAE): docs/api.md.
POSITIVE_WEIGHT = 1.0
NEGATIVE_WEIGHT = 0.5
MAX_WEIGHT = 100.0
# Below this norm (with positive_weight scaled to 1) the examples cancel out: no direction is left.
MIN_NORM = 1e-3


@dataclass(frozen=True)
class Example:
    """One example: an upload's ``data`` (with its file ``name``) or a stored ``image_id``."""

    data: bytes | None = None
    name: str | None = None
    image_id: int | None = None


@dataclass(frozen=True)
class UsedExample:
    """An example as combined: ``weight`` is its factor in the sum (its side's weight / count)."""

    example: Example
    weight: float


@dataclass
class ExamplesResult(SearchResult):
    positive: list[UsedExample] = field(default_factory=list)
    negative: list[UsedExample] = field(default_factory=list)
    positive_weight: float = POSITIVE_WEIGHT
    negative_weight: float = NEGATIVE_WEIGHT


def check_examples(positives: Sequence[Example], negatives: Sequence[Example]) -> None:
    """422 for no positive, more than ``MAX_EXAMPLES``, or a stored id given twice."""
    if not positives:
        raise InvalidRequest(
            "a search needs at least one positive example: a file, positive_file or positive part"
        )
    if (count := len(positives) + len(negatives)) > MAX_EXAMPLES:
        raise InvalidRequest(f"a search takes at most {MAX_EXAMPLES} examples, got {count}")
    seen: set[int] = set()
    for example in [*positives, *negatives]:
        if example.image_id is None:
            continue
        if example.image_id in seen:
            raise InvalidRequest(f"image {example.image_id} is given twice as an example; give it once")
        seen.add(example.image_id)


def combine(
    *, positives: np.ndarray, negatives: np.ndarray, positive_weight: float, negative_weight: float
) -> np.ndarray:
    """The (1, d) float32 unit query of (p, d) positive and (n, d) negative codes (n may be 0),
    each row L2-normalised first; 422 when they cancel out."""
    p = positives / np.linalg.norm(positives, axis=1, keepdims=True)
    raw = p.mean(axis=0)
    if len(negatives):
        n = negatives / np.linalg.norm(negatives, axis=1, keepdims=True)
        raw = raw - (negative_weight / positive_weight) * n.mean(axis=0)
    norm = float(np.linalg.norm(raw))
    if not norm > MIN_NORM:
        raise InvalidRequest(
            "the negative examples cancel the positive ones (the combined query has no direction "
            "left): lower negative_weight or choose other examples"
        )
    return (raw / norm).reshape(1, -1).astype(np.float32)


def search_by_examples(
    ctx: AppContext,
    *,
    collection: str,
    positives: Sequence[Example],
    negatives: Sequence[Example] = (),
    positive_weight: float = POSITIVE_WEIGHT,
    negative_weight: float = NEGATIVE_WEIGHT,
    k: int,
    image_filter: ImageFilter | None = None,
    qe: int | None = None,
    knobs: SearchKnobs | None = None,
) -> ExamplesResult:
    """The combined query of the examples searched as ``search_by_image`` searches one image;
    the stored examples are left out of the hits. 404 for a stored id that is not in the
    collection; 422 for an upload that does not decode, and as ``check_examples`` says."""
    check_k(ctx, k)
    check_examples(positives, negatives)
    clock = Clock()
    record, checkpoint = served_collection(ctx, collection)
    examples = [*positives, *negatives]
    codes: dict[int, np.ndarray] = {}  # position in examples -> (d,) float32
    uploads = [i for i, e in enumerate(examples) if e.image_id is None]
    if uploads:
        embedder = ctx.embedders.for_collection(record, checkpoint)
        tensors = [
            prepare(ctx, record=record, checkpoint=checkpoint, data=examples[i].data or b"")[1]
            for i in uploads
        ]
        clock.lap("decode")
        embedded = embedder.embed_prepared(tensors)
        if faults := degenerate_codes(embedded, embedder=record.embedder, query=True):
            raise next(iter(faults.values()))
        codes.update(zip(uploads, embedded, strict=True))
        clock.lap("embed")
    stored = [i for i, e in enumerate(examples) if e.image_id is not None]
    if stored:
        codes.update(_stored_codes(ctx, record=record, examples=examples, positions=stored))
        clock.lap("stored")
    rows = np.stack([codes[i] for i in range(len(examples))]).astype(np.float32)
    query = combine(
        positives=rows[: len(positives)],
        negatives=rows[len(positives) :],
        positive_weight=positive_weight,
        negative_weight=negative_weight,
    )
    (pairs,) = ranked(
        ctx,
        record=record,
        vectors=query,
        k=k,
        clock=clock,
        excludes=[{examples[i].image_id or 0 for i in stored}],
        image_filter=image_filter,
        qe=qe,
        knobs=knobs,
    )
    hits = hits_of(pairs, rows_of(ctx, ids=[i for i, _ in pairs]))
    clock.lap("fetch")
    return ExamplesResult(
        collection=record.name,
        k=k,
        hits=hits,
        timings_ms=clock.done(),
        positive=[UsedExample(e, positive_weight / len(positives)) for e in positives],
        negative=[UsedExample(e, negative_weight / len(negatives)) for e in negatives],
        positive_weight=positive_weight,
        negative_weight=negative_weight,
    )


def _stored_codes(
    ctx: AppContext, *, record: CollectionRecord, examples: Sequence[Example], positions: list[int]
) -> dict[int, np.ndarray]:
    """Position -> the stored (d,) code of each stored example, read in one query; the first
    example that cannot be one raises its error (``stored_codes``)."""
    codes = stored_codes(ctx, record=record, image_ids=[int(examples[i].image_id or 0) for i in positions])
    found: dict[int, np.ndarray] = {}
    for i in positions:
        code = codes[int(examples[i].image_id or 0)]
        if isinstance(code, CbirError):
            raise code
        found[i] = code
    return found
