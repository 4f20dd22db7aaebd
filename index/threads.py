"""How many OpenMP threads one FAISS search uses.

A single query searches on one thread: an exact search of one vector is too little work to split
(the MNIST demo's 60,000 codes on 2 cores: the search stage of one query 0.86 ms on one thread,
2.0 ms on two, which is what a thread of the web server got by default). A batch of queries is
enough work for every core, so it gets them (100 queries over the same codes: 45 ms on one
thread, 25 ms on two).

FAISS chooses between its sequential scan and a BLAS matrix product by the size of the query
matrix: the scan while ``nq * d`` is under ``distance_compute_blas_threshold``. Its default, 128,000,
suits machines with tens of threads; on few cores the product wins from far smaller batches (100
queries of 84 dimensions over 60,000 codes, 2 cores: 22 ms scanning, 9 ms by BLAS), so the
threshold is ``BLAS_PER_THREAD`` times the cores (FAISS pull request 5109 measured the crossover
at 640-1,280 per thread). A single query of fewer than that many dimensions still scans.

OpenMP keeps its thread count per calling thread (and torch and FAISS share the runtime), so the
count is set for this search, in this thread, and then put back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import faiss

BATCH_QUERIES = 16  # from this many queries on, one search uses every core
BLAS_PER_THREAD = 800


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_blas_for_batches() -> None:
    """Set FAISS's BLAS threshold for this machine's cores (process-wide; idempotent)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_PER_THREAD * cores()


use_blas_for_batches()


@contextmanager
def search_threads(queries: int) -> Iterator[int]:
    """The OpenMP threads of a search of ``queries`` vectors made in this block, in this thread."""
    wanted = cores() if queries >= BATCH_QUERIES else 1
    before = faiss.omp_get_max_threads()
    if wanted == before:
        yield before
        return
    faiss.omp_set_num_threads(wanted)
    try:
        yield wanted
    finally:
        faiss.omp_set_num_threads(before)
