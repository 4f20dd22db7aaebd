"""Retrieval quality: precision and mean average precision of an exact cosine ranking.

numpy only (the index room never imports torch). Used by the benchmarks and by tests that
hold a learned embedder to a quality bar.
"""

from __future__ import annotations

import numpy as np


def evaluate_retrieval(
    *,
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    db_vectors: np.ndarray,
    db_labels: np.ndarray,
    k: int = 10,
    batch_size: int = 256,
    exclude_self: bool = False,
) -> dict[str, float | int]:
    """Rank every db row for every query by inner product and score it against labels.

    ``query_vectors`` (q, d) and ``db_vectors`` (n, d) are float32 and L2-normalised, so the
    inner product is the cosine similarity. Labels are integer arrays of length q and n; a db
    row is relevant to a query when the labels are equal. The ranking is by score, highest
    first, ties in db order (a stable sort). ``exclude_self`` drops db row i from query i's
    ranking (the queries are the db itself).

    Returns a dict:

    - ``p_at_10``: P@k, the mean over queries of (relevant in the top k) / k (k=10 by default;
      the key keeps its name for any k).
    - ``map_at_10``: mAP@k, the mean over queries of sum_{i<=k} P@i * rel_i / min(k, R), where
      R is the number of relevant db rows for the query and rel_i is 1 when rank i is relevant.
    - ``map_all``: mAP@all, the mean over queries of the standard average precision over the
      full ranking, sum_i P@i * rel_i / R = (1/R) sum_j j / rank_j over the relevant rows j.
    - ``queries``: the number of queries.

    A query with no relevant row scores 0 on all three. Queries are scored in batches, so
    memory is O(batch_size * n) (about 150 MB for 256 x 60,000) and 10,000 x 60,000 takes
    about 20 s on one core.
    """
    query_vectors = np.asarray(query_vectors, dtype=np.float32)
    db_vectors = np.asarray(db_vectors, dtype=np.float32)
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if query_vectors.ndim != 2 or db_vectors.ndim != 2:
        raise ValueError("query_vectors and db_vectors must be 2-d (n, d) arrays")
    q, n = query_vectors.shape[0], db_vectors.shape[0]
    if query_vectors.shape[1] != db_vectors.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries have {query_vectors.shape[1]}, db {db_vectors.shape[1]}"
        )
    if query_labels.shape != (q,) or db_labels.shape != (n,):
        raise ValueError("one label per query and per db row is required")
    if exclude_self and q != n:
        raise ValueError("exclude_self needs the queries to be the db (same number of rows)")
    ranked = n - 1 if exclude_self else n
    if not 1 <= k <= ranked:
        raise ValueError(f"k must be in [1, {ranked}], got {k}")
    if q == 0:
        return {"p_at_10": 0.0, "map_at_10": 0.0, "map_all": 0.0, "queries": 0}

    # Dense class ids: the db rows of each class are one fixed column set, so the relevant
    # scores of all queries of a class form a rectangular block that sorts in one call.
    classes, db_class = np.unique(db_labels, return_inverse=True)
    class_rows = [np.flatnonzero(db_class == c) for c in range(len(classes))]
    query_class = np.searchsorted(classes, query_labels).clip(max=len(classes) - 1)
    query_class[classes[query_class] != query_labels] = -1  # label absent from the db

    p_at_k = np.zeros(q)
    ap_at_k = np.zeros(q)
    ap_all = np.zeros(q)
    for start in range(0, q, batch_size):
        stop = min(start + batch_size, q)
        scores = query_vectors[start:stop] @ db_vectors.T  # (b, n)
        if exclude_self:
            # -inf sorts below every real score and is never >= one, so it drops out.
            scores[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        ascending = np.sort(scores, axis=1)
        threshold = ascending[:, n - k]  # the k-th highest score of each row
        for c in np.unique(query_class[start:stop]):
            if c < 0:
                continue
            rows = np.flatnonzero(query_class[start:stop] == c)
            relevant_sorted = np.sort(scores[np.ix_(rows, class_rows[c])], axis=1)
            for row, rel_asc in zip(rows, relevant_sorted, strict=True):
                i = start + row
                relevant = len(rel_asc) - int(exclude_self)
                if relevant <= 0:
                    continue  # nothing to find: the query scores 0
                top = _top_k(scores[row], threshold=threshold[row], k=k)
                hits = np.cumsum(db_class[top] == c)
                rel_top = np.diff(hits, prepend=0)
                p_at_k[i] = hits[-1] / k
                ap_at_k[i] = (hits / np.arange(1, k + 1) * rel_top).sum() / min(k, relevant)
                ap_all[i] = _average_precision(
                    scores[row], ascending=ascending[row], relevant_ascending=rel_asc,
                    relevant=relevant, db_class=db_class, c=c,
                )  # fmt: skip

    return {
        "p_at_10": float(p_at_k.mean()),
        "map_at_10": float(ap_at_k.mean()),
        "map_all": float(ap_all.mean()),
        "queries": int(q),
    }


def _top_k(row: np.ndarray, *, threshold: float, k: int) -> np.ndarray:
    """Db indices of the k best scores of one (n,) row, by score desc then index asc."""
    candidates = np.flatnonzero(row >= threshold)  # k of them, more when the k-th score ties
    return candidates[np.lexsort((candidates, -row[candidates]))][:k]


def _average_precision(
    row: np.ndarray,
    *,
    ascending: np.ndarray,
    relevant_ascending: np.ndarray,
    relevant: int,
    db_class: np.ndarray,
    c: int,
) -> float:
    """AP of one query from its sorted scores, without materialising the ranking (see ``_ranks``)."""
    if relevant <= 0:
        return 0.0
    ranks = _ranks(
        row,
        ascending=ascending,
        relevant_ascending=relevant_ascending,
        count=relevant,
        db_class=db_class,
        c=c,
    )
    j = np.arange(1, relevant + 1)
    return float((j / ranks).sum() / relevant)


def precision_recall_curve(
    *,
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    db_vectors: np.ndarray,
    db_labels: np.ndarray,
    levels: int = 11,
    batch_size: int = 256,
) -> dict[str, list[float]]:
    """Interpolated precision at ``levels`` evenly spaced recall levels (0, 0.1, ..., 1 for 11),
    averaged over queries: the classic precision-recall curve of a ranked retrieval.

    Vectors and labels as in ``evaluate_retrieval`` (float32 unit rows, so inner product =
    cosine; same label = relevant; ties ranked in db order). The interpolated precision of a
    query at recall r is the highest precision it reaches at any recall >= r; a query with no
    relevant db row contributes 0 at every level. Returns ``{"recall": [...], "precision":
    [...]}``, both of length ``levels``. Costs about what ``evaluate_retrieval`` costs (one
    sort of every query's scores).
    """
    query_vectors = np.asarray(query_vectors, dtype=np.float32)
    db_vectors = np.asarray(db_vectors, dtype=np.float32)
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if query_vectors.ndim != 2 or db_vectors.ndim != 2:
        raise ValueError("query_vectors and db_vectors must be 2-d (n, d) arrays")
    if query_vectors.shape[1] != db_vectors.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries have {query_vectors.shape[1]}, db {db_vectors.shape[1]}"
        )
    q, n = query_vectors.shape[0], db_vectors.shape[0]
    if query_labels.shape != (q,) or db_labels.shape != (n,):
        raise ValueError("one label per query and per db row is required")
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    recall_levels = np.linspace(0.0, 1.0, levels)
    if q == 0 or n == 0:
        return {"recall": recall_levels.tolist(), "precision": [0.0] * levels}

    classes, db_class = np.unique(db_labels, return_inverse=True)
    class_rows = [np.flatnonzero(db_class == c) for c in range(len(classes))]
    query_class = np.searchsorted(classes, query_labels).clip(max=len(classes) - 1)
    query_class[classes[query_class] != query_labels] = -1

    total = np.zeros(levels)
    for start in range(0, q, batch_size):
        stop = min(start + batch_size, q)
        scores = query_vectors[start:stop] @ db_vectors.T  # (b, n)
        ascending = np.sort(scores, axis=1)
        for row in range(stop - start):
            c = query_class[start + row]
            if c < 0:
                continue
            ranks = _relevant_ranks(
                scores[row], ascending=ascending[row], relevant=class_rows[c], db_class=db_class, c=c
            )
            found = np.arange(1, len(ranks) + 1)
            precision = found / ranks
            recall = found / len(ranks)
            # Best precision at any recall >= each point, then read off at each level.
            best_after = np.maximum.accumulate(precision[::-1])[::-1]
            at = np.searchsorted(recall, recall_levels - 1e-12, side="left").clip(max=len(ranks) - 1)
            total += best_after[at]
    return {"recall": recall_levels.tolist(), "precision": (total / q).tolist()}


def _relevant_ranks(
    row: np.ndarray, *, ascending: np.ndarray, relevant: np.ndarray, db_class: np.ndarray, c: int
) -> np.ndarray:
    """1-based ranks of the relevant db rows of one query, best first (ties in db order)."""
    relevant_ascending = np.sort(row[relevant])
    return _ranks(
        row,
        ascending=ascending,
        relevant_ascending=relevant_ascending,
        count=len(relevant_ascending),
        db_class=db_class,
        c=c,
    )


def _ranks(
    row: np.ndarray,
    *,
    ascending: np.ndarray,
    relevant_ascending: np.ndarray,
    count: int,
    db_class: np.ndarray,
    c: int,
) -> np.ndarray:
    """1-based ranks of the ``count`` best relevant rows, best first.

    The j-th best relevant row sits at rank (rows scoring strictly higher) + (its place among
    the relevant rows of equal score). Where an irrelevant row ties a relevant one (common in
    float32), db order decides the places within that score.
    """
    n, m = len(ascending), len(relevant_ascending)
    values = relevant_ascending[::-1][:count]  # best first; a -inf self is cut off
    above_all = n - np.searchsorted(ascending, values, side="right")
    equal_all = n - np.searchsorted(ascending, values, side="left") - above_all
    above_rel = m - np.searchsorted(relevant_ascending, values, side="right")
    equal_rel = m - np.searchsorted(relevant_ascending, values, side="left") - above_rel
    ranks = above_all + (np.arange(1, count + 1) - above_rel)
    for value in np.unique(values[equal_all != equal_rel]):
        group = np.flatnonzero(values == value)  # consecutive j's sharing this score
        tied = np.flatnonzero(row == value)  # every row with this score, in db order
        ranks[group] = above_all[group] + np.flatnonzero(db_class[tied] == c) + 1
    return ranks


def inria_average_precision(relevant_ranks: np.ndarray, *, relevant: int) -> float:
    """Average precision as INRIA's ``eval_holidays`` (``score_ap_from_ranks_1``) computes it.

    Each retrieved relevant item adds a trapezoid of width 1/R between the precision just before
    it, hits / (rank - 1) (1 at rank 1), and the precision at it, (hits + 1) / rank.
    ``relevant_ranks`` are the 1-based ranks of the retrieved relevant items, ascending;
    ``relevant`` (R) counts every relevant item, so a miss adds nothing.
    """
    if relevant <= 0:
        return 0.0
    ranks = np.asarray(relevant_ranks, dtype=np.float64)
    hits_before = np.arange(len(ranks), dtype=np.float64)
    before = np.where(ranks > 1, hits_before / np.maximum(ranks - 1, 1), 1.0)
    at = (hits_before + 1) / ranks
    return float(np.sum((before + at) / 2.0) / relevant)


def evaluate_groundtruth(
    *,
    scores: np.ndarray,
    relevant: list[np.ndarray],
    k: int = 10,
) -> dict[str, float | int]:
    """Score rankings against explicit relevance lists (Holidays-style ground truth).

    ``scores`` is (q, n) float: query i's similarity to each db row, with rows that must not be
    ranked (the query itself) set to -inf. ``relevant[i]`` holds the db rows relevant to query i.
    Ties are broken by db order. Returns ``p_at_10`` (P@k), ``map_at_10`` (mAP@k, as in
    ``evaluate_retrieval``), ``map_all`` (INRIA's trapezoid AP over the full ranking, the
    protocol of the Holidays benchmark) and ``queries``.
    """
    p_at_k, ap_at_k, ap_all = [], [], []
    for row, rel in zip(scores, relevant, strict=True):
        order = np.argsort(-row, kind="stable")
        ranked = order[np.isfinite(row[order])]
        is_rel = np.isin(ranked, rel)
        ranks = np.flatnonzero(is_rel) + 1
        total = len(rel)
        top = is_rel[:k]
        p_at_k.append(top.sum() / k)
        cumulative = np.cumsum(top) / np.arange(1, len(top) + 1)
        ap_at_k.append(float((cumulative * top).sum() / min(k, total)) if total else 0.0)
        ap_all.append(inria_average_precision(ranks, relevant=total))
    return {
        "p_at_10": float(np.mean(p_at_k)) if p_at_k else 0.0,
        "map_at_10": float(np.mean(ap_at_k)) if ap_at_k else 0.0,
        "map_all": float(np.mean(ap_all)) if ap_all else 0.0,
        "queries": len(p_at_k),
    }
