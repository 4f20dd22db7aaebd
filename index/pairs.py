"""Near pairs of one set of vectors: every two rows whose inner product reaches a threshold, and the
connected components they make (near-duplicate groups).

Never an all-pairs matrix: the products are taken block by block (BLAS matrix products of at most
``BLOCK_VALUES`` scores) and each row keeps at most ``k`` neighbours at or above the threshold, so
memory stays at the vectors plus (n, k) best lists whatever the threshold. Up to ``exact_limit``
rows every pair is scored (exact); above it the rows are clustered (spherical k-means on a sample,
``nlist`` about sqrt(nprobe * n) cells, which balances the cost of assigning rows against that of
scanning cells) and each row is scored against the members of its ``nprobe`` nearest cells (an
inverted-file k-NN graph, searched a cell at a time so every product is a BLAS block: the same work
as an IVF search, with the cell's vectors read once per block instead of once per query).

A row with more than ``k`` neighbours at or above the threshold keeps its ``k`` best; the number of
such rows is ``Pairs.truncated_rows``: a pair beyond the cap of both its rows is not reported,
although the rows usually still end up in one component through the kept ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

__all__ = ["Pairs", "components", "similar_pairs"]

BLOCK_VALUES = 1 << 23  # scores per block product: 32 MB of float32 whatever n
EXACT_LIMIT = 20_000  # rows up to which every pair is scored (d=1280: about 3 s on 2 cores)
NEIGHBOURS = 16  # neighbours kept per row
NPROBE = 8  # cells scanned per row above the exact limit
TRAIN_PER_CELL = 40  # k-means sample: rows per cell (FAISS warns below 39)
KMEANS_ITERATIONS = 10


@dataclass(frozen=True)
class Pairs:
    """Unordered pairs of ids, each once, ``left < right``, ascending by (left, right); ``score`` is
    their inner product (float32). ``truncated_rows``: rows that had more than ``k`` neighbours at or
    above the threshold and kept their ``k`` best; ``method``: "exact" or "ivf"."""

    left: np.ndarray
    right: np.ndarray
    score: np.ndarray
    truncated_rows: int = 0
    method: str = "exact"

    def __len__(self) -> int:
        return len(self.left)


def similar_pairs(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    threshold: float,
    k: int = NEIGHBOURS,
    exact_limit: int = EXACT_LIMIT,
    nprobe: int = NPROBE,
    seed: int = 0,
    check: Callable[[], None] | None = None,
) -> Pairs:
    """The pairs of ``ids`` ((n,) int64, distinct) whose rows of ``vectors`` ((n, d) float32, unit
    rows) have an inner product (cosine similarity) of at least ``threshold`` (in [-1, 1]), at most
    ``k`` per row (its best). Exact up to ``exact_limit`` rows, an inverted-file k-NN graph above.
    ``check`` is called between blocks (a fraction of a second apart): what it raises stops the work."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is not a cosine similarity in [-1, 1]")
    if k < 1:
        raise ValueError("k must be at least 1")
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(ids)
    if vectors.ndim != 2 or len(vectors) != n:
        raise ValueError(f"vectors {vectors.shape} do not match {n} ids")
    best = _Best(n, k)
    check = check or _nothing
    if n < 2:
        return best.pairs(ids, method="exact")
    if n <= exact_limit:
        _exact(vectors, best, threshold=float(threshold), check=check)
        return best.pairs(ids, method="exact")
    _inverted(vectors, best, threshold=float(threshold), nprobe=nprobe, seed=seed, check=check)
    return best.pairs(ids, method="ivf")


def _nothing() -> None:
    pass


class _Best:
    """The ``k`` best neighbours found so far of each of ``n`` rows (positions, -1 for none) and how
    many at or above the threshold each row was offered."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.score = np.full((n, k), -np.inf, dtype=np.float32)
        self.other = np.full((n, k), -1, dtype=np.int64)
        self.offered = np.zeros(n, dtype=np.int64)

    def offer(self, rows: np.ndarray, others: np.ndarray, scores: np.ndarray) -> None:
        """Candidates (row, other row, score), each (row, other) at most once over all offers."""
        if not len(rows):
            return
        self.offered += np.bincount(rows, minlength=len(self.offered))
        touched = np.unique(rows)
        k = self.k
        all_rows = np.concatenate([np.repeat(touched, k), rows])
        all_other = np.concatenate([self.other[touched].ravel(), others])
        all_score = np.concatenate([self.score[touched].ravel(), scores])
        order = np.lexsort((-all_score, all_rows))
        all_rows, all_other, all_score = all_rows[order], all_other[order], all_score[order]
        starts = np.flatnonzero(np.r_[True, all_rows[1:] != all_rows[:-1]])
        rank = np.arange(len(all_rows)) - np.repeat(starts, np.diff(np.r_[starts, len(all_rows)]))
        keep = rank < k
        self.score[all_rows[keep], rank[keep]] = all_score[keep]
        self.other[all_rows[keep], rank[keep]] = all_other[keep]

    def pairs(self, ids: np.ndarray, *, method: str) -> Pairs:
        rows, slots = np.nonzero(self.other >= 0)
        a, b = ids[rows], ids[self.other[rows, slots]]
        score = self.score[rows, slots]
        left, right = np.minimum(a, b), np.maximum(a, b)
        # the same pair found from both rows: keep one, with the higher of its two scores
        order = np.lexsort((-score, right, left))
        left, right, score = left[order], right[order], score[order]
        first = np.r_[True, (left[1:] != left[:-1]) | (right[1:] != right[:-1])][: len(left)]
        return Pairs(
            left=left[first],
            right=right[first],
            score=score[first].astype(np.float32),
            truncated_rows=int(np.count_nonzero(self.offered > self.k)),
            method=method,
        )


def _block_hits(
    queries: np.ndarray, members: np.ndarray, *, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, member row, score) of the products of ``queries`` (q, d) and ``members`` (m, d)
    at or above ``threshold``, positions within the two blocks."""
    scores = queries @ members.T
    q, m = np.nonzero(scores >= threshold)
    return q, m, scores[q, m]


def _exact(vectors: np.ndarray, best: _Best, *, threshold: float, check: Callable[[], None]) -> None:
    """Every pair i < j, scored in blocks of rows against the rows after them; each hit is offered
    to both of its rows."""
    n = len(vectors)
    step = max(1, BLOCK_VALUES // n)
    for start in range(0, n, step):
        check()
        stop = min(n, start + step)
        q, m, s = _block_hits(vectors[start:stop], vectors[start:], threshold=threshold)
        later = m > q  # member position start + m after query position start + q
        q, m, s = q[later] + start, m[later] + start, s[later]
        best.offer(np.concatenate([q, m]), np.concatenate([m, q]), np.concatenate([s, s]))


def _cells(
    vectors: np.ndarray, *, nprobe: int, seed: int, check: Callable[[], None]
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means cells of the rows: ((n,) the cell of each row, (n, nprobe) the cells each
    row scans, its own first)."""
    n, d = vectors.shape
    nlist = max(1, min(n // TRAIN_PER_CELL, round(math.sqrt(nprobe * n))))
    nprobe = min(nprobe, nlist)
    sample = np.random.default_rng(seed).choice(n, size=min(n, nlist * TRAIN_PER_CELL), replace=False)
    kmeans = faiss.Kmeans(
        d,
        nlist,
        niter=KMEANS_ITERATIONS,
        spherical=True,
        seed=seed,
        max_points_per_centroid=TRAIN_PER_CELL,
        verbose=False,
    )
    kmeans.train(vectors[np.sort(sample)])
    assert kmeans.centroids is not None  # set by train
    centroids = faiss.IndexFlatIP(d)
    centroids.add(kmeans.centroids)
    probes = np.empty((n, nprobe), dtype=np.int64)
    step = max(1, BLOCK_VALUES // nlist)
    for start in range(0, n, step):
        check()
        _, found = centroids.search(vectors[start : start + step], nprobe)
        probes[start : start + step] = found
    return probes[:, 0].copy(), probes


def _inverted(
    vectors: np.ndarray,
    best: _Best,
    *,
    threshold: float,
    nprobe: int,
    seed: int,
    check: Callable[[], None],
) -> None:
    """Each row against the members of the cells it scans, a cell at a time; each hit is offered to
    its query row only (the other row finds it again when it scans this row's cell)."""
    own, probes = _cells(vectors, nprobe=nprobe, seed=seed, check=check)
    nlist = int(probes.max()) + 1
    members_of = np.argsort(own, kind="stable")
    member_bounds = np.searchsorted(own[members_of], np.arange(nlist + 1))
    flat = probes.ravel()
    scanners_of = np.argsort(flat, kind="stable") // probes.shape[1]  # rows, grouped by cell scanned
    scanner_bounds = np.searchsorted(np.sort(flat), np.arange(nlist + 1))
    for cell in range(nlist):
        members = members_of[member_bounds[cell] : member_bounds[cell + 1]]
        scanners = scanners_of[scanner_bounds[cell] : scanner_bounds[cell + 1]]
        if not len(members) or not len(scanners):
            continue
        member_vectors = vectors[members]
        step = max(1, BLOCK_VALUES // len(members))
        for start in range(0, len(scanners), step):
            check()
            rows = scanners[start : start + step]
            q, m, s = _block_hits(vectors[rows], member_vectors, threshold=threshold)
            rows, others = rows[q], members[m]
            other = rows != others
            best.offer(rows[other], others[other], s[other])


def components(pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """The connected components of the graph of ``pairs``: ((m,) int64 the ids in any pair, ascending;
    (m,) int64 the component of each), components numbered 0, 1, ... largest first (ties: the one
    with the smaller least id first)."""
    nodes, inverse = np.unique(np.concatenate([pairs.left, pairs.right]), return_inverse=True)
    if not len(nodes):
        return nodes.astype(np.int64), np.zeros(0, dtype=np.int64)
    a, b = inverse[: len(pairs)], inverse[len(pairs) :]
    parent = np.arange(len(nodes))
    while True:
        # pointer jumping to the roots, then hook each edge's larger root under its smaller one;
        # roots only ever decrease, so this ends (in a few rounds on near-duplicate graphs)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
    _, root_index, sizes = np.unique(parent, return_inverse=True, return_counts=True)
    # roots are their component's least position, so ties by size go to the smaller least id
    roots = np.unique(parent)
    order = np.lexsort((roots, -sizes))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return nodes.astype(np.int64), rank[root_index]
