"""The factory strings cbir builds: a whitelist grammar with every number checked.

FAISS parses far more than cbir serves, and some strings it parses kill the process when it trains
or adds (``HNSW0``: an assertion and SIGABRT; ``HNSW1``: SIGSEGV; ``PQ8x0`` and ``OPQ8_0``: SIGFPE).
An assertion cannot be caught, so a string is checked here before FAISS ever sees it::

    factory := ["IDMap2,"] ["OPQ" M ["_" D] ","] body ["," ("RFlat" | "Refine(Flat)")]
    body    := "Flat" | "HNSW" M | "IVF" nlist "," code | pq
    code    := "Flat" | "SQ4" | "SQ6" | "SQ8" | "SQfp16" | pq
    pq      := "PQ" m ["x" bits]

OPQ goes only in front of a PQ code, and a refinement only behind an approximate body.
"""

from __future__ import annotations

import re

__all__ = ["HNSW_M", "NLIST", "OPQ_DIM", "PQ_BITS", "check_factory"]

# Inclusive bounds. HNSW: M=1 crashes FAISS, and past 512 links a node the graph outweighs the
# vectors many times over. IVF: 65536 lists is what ``auto`` gives a billion vectors (kinds.ivf_nlist);
# more train for hours on a 2-core machine. PQ: 0 bits crashes; 12 bits already train 4096 centroids
# per sub-quantiser.
HNSW_M = (2, 512)
NLIST = (1, 65536)
PQ_BITS = (1, 12)
OPQ_DIM = (1, 4096)

_OPQ = re.compile(r"OPQ(\d+)(?:_(\d+))?")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?")
_HNSW = re.compile(r"HNSW(\d+)")
_IVF = re.compile(r"IVF(\d+)")
_CODES = {"Flat", "SQ4", "SQ6", "SQ8", "SQfp16"}
_REFINE = {"RFlat", "Refine(Flat)"}
SUPPORTED = (
    "Flat, HNSW{M}, IVF{nlist},Flat, IVF{nlist},SQ8 (or SQ4, SQ6, SQfp16), IVF{nlist},PQ{m}[x{bits}], "
    "PQ{m}[x{bits}], optionally OPQ{m}[_{d}], in front of a PQ code and ,RFlat behind"
)


def _bounded(value: str, bounds: tuple[int, int], what: str) -> int:
    number = int(value)
    low, high = bounds
    if not low <= number <= high:
        raise ValueError(f"{what} must be between {low} and {high}; got {number}")
    return number


def _check_pq(part: str, *, dim: int | None) -> None:
    match = _PQ.fullmatch(part)
    assert match is not None
    m = int(match.group(1))
    if m < 1 or (dim is not None and m > dim):
        raise ValueError(f"PQ m (sub-quantisers) must be between 1 and the dimension {dim or ''}; got {m}")
    if dim is not None and dim % m:
        raise ValueError(f"{part}: {m} sub-quantisers do not divide the {dim}-d vectors")
    if match.group(2) is not None:
        _bounded(match.group(2), PQ_BITS, "PQ bits per sub-quantiser code")


def check_factory(factory: str, *, dim: int | None) -> str:
    """The factory as cbir writes it, ``IDMap2,...`` (spaces dropped), or ``ValueError`` saying what
    is wrong. ``dim`` is the vectors' dimension (None while unknown: the checks that need it wait
    for the build)."""
    cleaned = "".join(factory.split())
    parts = cleaned.split(",")
    if parts[0] == "IDMap2":
        parts = parts[1:]
    unsupported = ValueError(f"{cleaned[:80]!r} is not a supported index kind: use {SUPPORTED}")
    if not parts or len(cleaned) > 120:
        raise unsupported
    refine = parts[-1] in _REFINE
    if refine:
        parts = parts[:-1]
    opq = _OPQ.fullmatch(parts[0]) if parts else None
    if opq:
        parts = parts[1:]
    body = parts
    pq_part: str | None = None
    if body == ["Flat"]:
        if refine or opq:
            raise unsupported
    elif len(body) == 1 and _HNSW.fullmatch(body[0]):
        _bounded(_HNSW.fullmatch(body[0]).group(1), HNSW_M, "HNSW M (links per node)")  # type: ignore[union-attr]
    elif len(body) == 2 and _IVF.fullmatch(body[0]) and (body[1] in _CODES or _PQ.fullmatch(body[1])):
        _bounded(_IVF.fullmatch(body[0]).group(1), NLIST, "IVF nlist (inverted lists)")  # type: ignore[union-attr]
        pq_part = body[1] if _PQ.fullmatch(body[1]) else None
    elif len(body) == 1 and _PQ.fullmatch(body[0]):
        pq_part = body[0]
    else:
        raise unsupported
    if opq and pq_part is None:
        raise ValueError(f"{cleaned[:80]!r}: OPQ goes only in front of a PQ code")
    code_dim = dim
    if opq:
        m = int(opq.group(1))
        out = _bounded(opq.group(2), OPQ_DIM, "OPQ output dimension") if opq.group(2) else dim
        if m < 1 or (out is not None and out % m):
            raise ValueError(f"OPQ{opq.group(1)}: its {m} sub-spaces must divide its output dimension {out}")
        code_dim = out
    if pq_part is not None:
        _check_pq(pq_part, dim=code_dim)
    return cleaned if cleaned.startswith("IDMap2,") else f"IDMap2,{cleaned}"
