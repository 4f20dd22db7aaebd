"""The factory strings cbir builds: a whitelist grammar with every number checked.

FAISS parses far more than cbir serves, and some strings it parses kill the process when it trains
or adds (``HNSW0``: an assertion and SIGABRT; ``HNSW1``: SIGSEGV; ``PQ8x0`` and ``OPQ8_0``: SIGFPE).
An assertion cannot be caught, so a string is checked here before FAISS ever sees it::

    factory := ["IDMap2,"] [pre ","] body ["," ("RFlat" | "Refine(Flat)")]
    pre     := "OPQ" M ["_" D] | "PCA" ["W"] ["R"] D
    body    := "Flat" | "HNSW" M [("_" | ",") ("Flat" | sq)] | "IVF" nlist "," code
    code    := "Flat" | sq | pq
    sq      := "SQ4" | "SQ6" | "SQ8" | "SQfp16"
    pq      := "PQ" m ["x" bits] | "PQ" m "x4fs" ["r"]

A pre-transform outputs at most the vectors' own dimension (``D <= d``); OPQ goes only in front of a
PQ code, whose m must divide its D; a refinement only behind an approximate body. Left out on
purpose: a PQ code without IVF (FAISS refuses the id filters every filtered search and deleted
vector needs) and HNSW over PQ codes (FAISS builds it for L2 distance only; cbir ranks by inner
product).
"""

from __future__ import annotations

import re

__all__ = ["HNSW_M", "NLIST", "PQ_BITS", "PRE_DIM", "SUPPORTED", "check_factory", "normalise_factory"]

# Inclusive bounds. HNSW: M=1 crashes FAISS; the graph holds 2*M links per vector (2 KB at M=256,
# four times a 128-d vector) and its build time grows with M: 256 is already far past any M that
# measures better. IVF: 65536 lists is what ``auto`` gives a billion vectors (kinds.ivf_nlist); more
# train for hours on a 2-core machine. PQ: 0 bits crashes; 12 bits already train 4096 centroids per
# sub-quantiser. A pre-transform's output is bounded by the input dimension, and by this while the
# dimension is not known yet.
HNSW_M = (2, 256)
NLIST = (1, 65536)
PQ_BITS = (1, 12)
PRE_DIM = (1, 4096)

_OPQ = re.compile(r"OPQ(\d+)(?:_(\d+))?")
_PCA = re.compile(r"PCA(W?)(R?)(\d+)")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+)(fsr?)?)?")
_HNSW = re.compile(r"HNSW(\d+)(?:_(\w+))?")
_IVF = re.compile(r"IVF(\d+)")
_SQ = {"SQ4", "SQ6", "SQ8", "SQfp16"}
_REFINE = {"RFlat", "Refine(Flat)"}
SUPPORTED = (
    "Flat, HNSW{M} (or HNSW{M},Flat, HNSW{M}_SQ8, _SQ4, _SQ6, _SQfp16), IVF{nlist},Flat, "
    "IVF{nlist},SQ8 (or SQ4, SQ6, SQfp16), IVF{nlist},PQ{m}[x{bits}], IVF{nlist},PQ{m}x4fs[r]; "
    "optionally PCA{d} (PCAR, PCAW, PCAWR) in front, or OPQ{m}[_{d}] in front of a PQ code, "
    "and ,RFlat behind an approximate kind"
)


def normalise_factory(factory: str) -> str:
    """``factory`` with spaces dropped and wrapped as ``IDMap2,<factory>`` unless already id-mapped."""
    factory = "".join(factory.split())
    return factory if factory.startswith("IDMap") else f"IDMap2,{factory}"


def _bounded(value: str, *, bounds: tuple[int, int], what: str) -> int:
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
    if match.group(3) is not None and match.group(2) != "4":
        raise ValueError(f"{part}: fast-scan PQ codes (fs) have 4 bits per sub-quantiser code")
    if match.group(2) is not None:
        _bounded(match.group(2), bounds=PQ_BITS, what="PQ bits per sub-quantiser code")


def _pre_dim(part: str, *, dim: int | None) -> int | None:
    """The output dimension of the pre-transform ``part`` (OPQ or PCA), checked against ``dim``."""
    opq = _OPQ.fullmatch(part)
    pca = _PCA.fullmatch(part)
    what = "OPQ" if opq else "PCA"
    given = opq.group(2) if opq else pca.group(3) if pca else None
    out = _bounded(given, bounds=PRE_DIM, what=f"{what} output dimension") if given is not None else dim
    if out is not None and dim is not None and out > dim:
        # A transform to more dimensions than the vectors have adds nothing but training time
        # (OPQ8_4096 on 64-d vectors learns a 4096x4096 rotation for minutes).
        raise ValueError(f"{part}: the {what} output dimension {out} exceeds the vectors' {dim}")
    if opq:
        m = int(opq.group(1))
        if m < 1 or (out is not None and out % m):
            raise ValueError(f"{part}: its {m} OPQ sub-spaces must divide its output dimension {out}")
    return out


def _body(parts: list[str], *, unsupported: ValueError) -> str | None:
    """Check the index body; returns its PQ code part (None if it has none)."""
    head = parts[0] if parts else ""
    hnsw = _HNSW.fullmatch(head)
    if parts == ["Flat"]:
        return None
    if hnsw and (len(parts) == 1 or (len(parts) == 2 and hnsw.group(2) is None)):
        storage = hnsw.group(2) if len(parts) == 1 else parts[1]
        if storage is not None and _PQ.fullmatch(storage):
            raise ValueError(
                f"{','.join(parts)}: FAISS builds HNSW over PQ codes for L2 distance only and cbir ranks "
                "by inner product; use HNSW{M}_SQ8 or IVF{nlist},PQ{m}"
            )
        if storage is not None and storage != "Flat" and storage not in _SQ:
            raise unsupported
        _bounded(hnsw.group(1), bounds=HNSW_M, what="HNSW M (links per node)")
        return None
    if (
        len(parts) == 2
        and _IVF.fullmatch(head)
        and (parts[1] in _SQ or parts[1] == "Flat" or _PQ.fullmatch(parts[1]))
    ):
        _bounded(head[3:], bounds=NLIST, what="IVF nlist (inverted lists)")
        return parts[1] if _PQ.fullmatch(parts[1]) else None
    if len(parts) == 1 and _PQ.fullmatch(head):
        raise ValueError(
            f"{head} without IVF: FAISS refuses the id filters that filtered searches and deleted "
            f"images need; use IVF{{nlist}},{head}"
        )
    raise unsupported


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
    refine = len(parts) > 1 and parts[-1] in _REFINE
    if refine:
        parts = parts[:-1]
    pre = parts[0] if parts and (_OPQ.fullmatch(parts[0]) or _PCA.fullmatch(parts[0])) else None
    if pre is not None:
        parts = parts[1:]
    pq_part = _body(parts, unsupported=unsupported)
    if refine and parts == ["Flat"]:
        raise ValueError(f"{cleaned[:80]!r}: a refinement goes only behind an approximate kind")
    code_dim = _pre_dim(pre, dim=dim) if pre is not None else dim
    if pre is not None and pre.startswith("OPQ") and pq_part is None:
        raise ValueError(f"{cleaned[:80]!r}: OPQ goes only in front of a PQ code")
    if pq_part is not None:
        _check_pq(pq_part, dim=code_dim)
    return cleaned if cleaned.startswith("IDMap2,") else f"IDMap2,{cleaned}"
