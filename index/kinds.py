"""Index kinds as FAISS factory strings, the automatic choice by size, and how each is built.

Kinds (all inner product over unit rows, ids through ``IDMap2``):

- exact: ``Flat``;
- graph: ``HNSW{M}`` (``HNSW32``, also written ``HNSW32,Flat``; ``HNSW32_SQ8`` keeps 8-bit scalar
  codes instead of the vectors): no training, cannot remove (deletes become tombstones);
- inverted lists: ``IVF{nlist},Flat``, ``IVF{nlist},SQ8``, or with product quantisation
  ``IVF{nlist},PQ{m}`` (``PQ{m}x4fs``: 4-bit fast-scan codes), optionally ``OPQ{m},`` in front (a
  learned rotation) and ``,RFlat`` behind (the candidates re-ranked exactly: high recall, but the
  full vectors are kept too);
- any of them behind ``PCA{d},`` (or ``PCAR``), which reduces the vectors to ``d`` dimensions first.

``index.factories`` holds the whole grammar and its bounds.
"""

from __future__ import annotations

import math
import re
from typing import Any

import faiss
import numpy as np

from index.factories import check_factory, normalise_factory
from index.search_params import SearchKnobs
from index.vector_index import VectorIndex

__all__ = [
    "AUTO",
    "EXACT_MAX",
    "auto_factory",
    "check_ahead",
    "configure_construction",
    "default_knobs",
    "ivf_pq_factory",
    "min_vectors",
    "servable_factory",
    "validate_factory",
]

AUTO = "auto"
# Exact search is memory-bandwidth bound: about 6 ms a query over 100k x 128 (FACTS.md), so a
# collection stays exact until it is bigger than that.
EXACT_MAX = 100_000
GRAPH_MAX = 5_000_000  # beyond: HNSW's memory (full vectors + links) is the limit; IVF-PQ codes
# A kind set ahead of the vectors it trains on may need at most this many times the collection's
# vectors (and in any case this many): exact search serves until they exist.
AHEAD_FACTOR = 100
AHEAD_FLOOR = 10_000
_HNSW_EF_SEARCH = 64
_IVF_NPROBE = 16
_REFINE_K_FACTOR = 8.0
_HNSW_EF_CONSTRUCTION = 40


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about sqrt(n), a power of two, 16 to 65536 (so that
    k-means trains in seconds on 64 vectors per list, and nprobe 16 visits a few per cent)."""
    return int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def ivf_pq_factory(n: int, dim: int, *, bytes_per_code: int | None = None, refine: bool = False) -> str:
    """``IVF{nlist},PQ{m}`` for ``n`` vectors of ``dim``: m sub-quantisers of 8 bits (m divides dim;
    by default dim / 4, i.e. 32 bytes for 128-d), ``,RFlat`` with ``refine``."""
    m = bytes_per_code or max(1, dim // 4)
    while dim % m:
        m -= 1
    factory = f"IVF{ivf_nlist(n)},PQ{m}"
    return f"{factory},RFlat" if refine else factory


def auto_factory(n: int, dim: int) -> str:
    """The kind a collection of ``n`` vectors gets when it asks for ``auto``: exact while small,
    then a graph (best recall per query time), then re-ranked IVF-PQ."""
    if n <= EXACT_MAX:
        return "Flat"
    if n <= GRAPH_MAX:
        return "HNSW32"
    return ivf_pq_factory(n, dim, refine=True)


def min_vectors(factory: str) -> int:
    """How many vectors ``factory`` needs to train on: its IVF lists, 2**bits per PQ codebook
    (256 for the default 8 bits; OPQ trains 8-bit codebooks of its own), and as many as a PCA
    outputs dimensions."""
    match = re.search(r"IVF(\d+)", factory)
    need = int(match.group(1)) if match else 0
    for bits in re.findall(r"(?<!O)PQ\d+(?:x(\d+))?", factory):
        need = max(need, 2 ** int(bits or 8))
    if "OPQ" in factory:
        need = max(need, 256)
    if pca := re.search(r"PCAW?R?(\d+)", factory):
        need = max(need, int(pca.group(1)))
    return need


def check_ahead(factory: str, *, n: int) -> None:
    """``ValueError`` when ``factory`` trains on far more vectors than a collection of ``n`` holds.
    A kind may be set ahead of its vectors (exact search serves until they exist), but not by far:
    past AHEAD_FACTOR times the collection, it is a slip of the keyboard or a guess, and its
    training, the day it comes, costs what that size costs."""
    need = min_vectors(factory)
    room = max(AHEAD_FLOOR, AHEAD_FACTOR * n)
    if need > room:
        kind = factory.removeprefix("IDMap2,")
        raise ValueError(
            f"{kind} trains on at least {need:,} vectors and the collection holds {n:,}, too few by "
            f"far: a kind set ahead of its vectors may need at most {room:,} (the larger of "
            f"{AHEAD_FLOOR:,} and {AHEAD_FACTOR} times the collection); use fewer lists or bits, or auto"
        )


def servable_factory(factory: str, n: int) -> str:
    """``factory``, or ``Flat`` while ``n`` vectors are too few to train it on."""
    return factory if n >= min_vectors(factory) else normalise_factory("Flat")


def validate_factory(factory: str, *, dim: int | None) -> str:
    """The normalised factory (``IDMap2,...``), or ``ValueError`` saying why cbir will not build it:
    first the whitelist grammar of ``index.factories`` (some strings FAISS parses abort the process
    when it trains or adds, which no ``except`` catches), then FAISS's own constructor."""
    normalised = check_factory(factory, dim=dim)
    if dim is None:
        return normalised
    try:
        faiss.index_factory(int(dim), normalised, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "unknown"
        raise ValueError(f"FAISS cannot build {normalised[7:]!r} for {dim}-d vectors: {reason}") from None
    return normalised


def default_knobs(factory: str) -> SearchKnobs:
    """Search parameters a new index of ``factory`` starts with (tuned on CDAE codes)."""
    kind = factory.upper()
    return SearchKnobs(
        ef_search=_HNSW_EF_SEARCH if "HNSW" in kind else None,
        nprobe=_IVF_NPROBE if "IVF" in kind else None,
        k_factor=_REFINE_K_FACTOR if "RFLAT" in kind or "REFINE" in kind else None,
    )


def new_index(dim: int, *, factory: str, meta: dict[str, Any] | None = None) -> VectorIndex:
    """An empty ``VectorIndex`` of ``factory`` with the default knobs and construction settings."""
    index = VectorIndex(dim, factory=factory, meta=meta)
    _set_construction(index)
    index.set_search_knobs(default_knobs(factory))
    return index


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    factory: str,
    meta: dict[str, Any] | None = None,
    knobs: SearchKnobs | None = None,
    train_size: int = 65_536,
) -> VectorIndex:
    """``VectorIndex.build`` with the default knobs (then ``knobs`` on top) and construction settings."""
    if len(ids) == 0:  # the dimension is not known yet: an empty exact index, replaced on the first add
        return new_index(
            int(vectors.shape[1]) if vectors.ndim == 2 and vectors.shape[1] else 1, factory="Flat", meta=meta
        )
    index = new_index(int(vectors.shape[1]), factory=factory, meta=meta)
    if not index.is_trained:
        index.train(vectors, sample=max(train_size, 64 * _nlist_of(index)))
    index.add(vectors, ids)
    if knobs:
        index.set_search_knobs(knobs)
    return index


def _nlist_of(index: VectorIndex) -> int:
    match = re.search(r"IVF(\d+)", index.factory)
    return int(match.group(1)) if match else 0


def _set_construction(index: VectorIndex) -> None:
    configure_construction(index._index.index)


def configure_construction(index: Any) -> None:
    """Build-time settings of a FAISS index (and those nested in it), chosen for 2-core machines:
    no polysemous training, HNSW efConstruction 40 (FAISS's default), OPQ 20 iterations on at most
    32k vectors (FAISS's 50 on 65k took minutes)."""
    inner: Any = faiss.downcast_index(index)
    if hasattr(inner, "do_polysemous_training"):
        # Polysemous code reordering (simulated annealing) was most of PQ's training time, 15 s on
        # 4,000 vectors, and only speeds up Hamming-filtered search, which cbir does not use.
        inner.do_polysemous_training = False
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
    elif isinstance(inner, faiss.IndexPreTransform):
        chain: Any = inner.chain  # a SWIG vector; the stubs call it a list
        for i in range(chain.size()):
            transform = faiss.downcast_VectorTransform(chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = 20
                transform.max_train_points = 32768
        configure_construction(inner.index)
    elif isinstance(inner, faiss.IndexRefine):
        configure_construction(inner.base_index)
