"""Search-time parameters of an index: the knobs of approximate kinds (efSearch, nprobe, k_factor)
and the id selectors of a filtered search, translated into the FAISS parameter objects that the
indexes nested in an id-mapped index expect."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

__all__ = ["SearchKnobs", "apply_knobs", "parts", "read_knobs", "search_parameters", "selector"]


@dataclass(frozen=True)
class SearchKnobs:
    """Search-time parameters of approximate kinds; ``None`` keeps the index's own setting.

    ``ef_search``: HNSW candidate list size; ``nprobe``: IVF lists visited; ``k_factor``: how many
    times ``k`` candidates an exact re-ranking stage (``...,RFlat``) re-scores.
    """

    ef_search: int | None = None
    nprobe: int | None = None
    k_factor: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.ef_search, self.nprobe, self.k_factor))

    def merged(self, override: SearchKnobs | None) -> SearchKnobs:
        """These knobs with every non-None field of ``override`` taking precedence."""
        if override is None:
            return self
        return SearchKnobs(
            ef_search=override.ef_search if override.ef_search is not None else self.ef_search,
            nprobe=override.nprobe if override.nprobe is not None else self.nprobe,
            k_factor=override.k_factor if override.k_factor is not None else self.k_factor,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parts(index: Any) -> Iterator[Any]:
    """``index`` and the FAISS indexes nested in it (pre-transforms, re-ranking bases), downcast."""
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexPreTransform):
        yield from parts(index.index)
    elif isinstance(index, faiss.IndexRefine):
        yield from parts(index.base_index)


def read_knobs(index: Any) -> SearchKnobs:
    """The search parameters set on a FAISS ``index`` (the one inside the id map) and its parts."""
    knobs: dict[str, Any] = {}
    for part in parts(index):
        if isinstance(part, faiss.IndexHNSW):
            knobs["ef_search"] = int(part.hnsw.efSearch)
        elif isinstance(part, faiss.IndexIVF):
            knobs["nprobe"] = int(part.nprobe)
        elif isinstance(part, faiss.IndexRefine):
            knobs["k_factor"] = float(part.k_factor)
    return SearchKnobs(**knobs)


def apply_knobs(index: Any, knobs: SearchKnobs) -> None:
    """Set ``knobs`` (its non-None fields) on a FAISS ``index`` and the parts they concern."""
    for part in parts(index):
        if isinstance(part, faiss.IndexHNSW) and knobs.ef_search is not None:
            part.hnsw.efSearch = int(knobs.ef_search)
        elif isinstance(part, faiss.IndexIVF) and knobs.nprobe is not None:
            part.nprobe = int(knobs.nprobe)
        elif isinstance(part, faiss.IndexRefine) and knobs.k_factor is not None:
            part.k_factor = float(knobs.k_factor)


def selector(*, allowed: np.ndarray | None, tombstones: np.ndarray, keep: list[Any]) -> Any | None:
    """The ids a search may return: ``allowed`` (all when None) minus ``tombstones``. FAISS holds
    raw pointers: every object made here is appended to ``keep``, to live until the search ends."""
    chosen: Any = None
    if allowed is not None:
        chosen = faiss.IDSelectorBatch(allowed)
        keep.append(chosen)
    if tombstones.size:
        buried = faiss.IDSelectorBatch(tombstones)
        alive = faiss.IDSelectorNot(buried)
        keep.extend((buried, alive))
        if chosen is not None:
            both = faiss.IDSelectorAnd(chosen, alive)
            keep.append(both)
            chosen = both
        else:
            chosen = alive
    return chosen


def search_parameters(index: Any, chosen: Any, *, knobs: SearchKnobs, keep: list[Any]) -> Any:
    """Search parameters for an id-mapped ``index``: ``chosen`` (a selector over our ids) and
    ``knobs``, of the types the nested indexes expect (IVF and HNSW refuse the base class), with
    each index's own settings kept where ``knobs`` leaves them.

    The id map translates the top-level selector to its internal positions; nested parameters
    (a re-ranking base, a pre-transformed index) are not translated by FAISS, so they get an
    ``IDSelectorTranslated`` over the same id map."""
    translated = None
    if chosen is not None:
        translated = faiss.IDSelectorTranslated(index.id_map, chosen)
        keep.append(translated)
    params = _params_for(index.index, translated, knobs=knobs, keep=keep)
    params.sel = chosen
    return params


def _params_for(index: Any, chosen: Any | None, *, knobs: SearchKnobs, keep: list[Any]) -> Any:
    swig: Any = faiss  # the SWIG stubs miss these keyword constructors
    inner = faiss.downcast_index(index)
    params: Any
    if isinstance(inner, faiss.IndexRefine):
        base = _params_for(inner.base_index, chosen, knobs=knobs, keep=keep)
        k_factor = knobs.k_factor if knobs.k_factor is not None else inner.k_factor
        params = swig.IndexRefineSearchParameters(k_factor=float(k_factor), base_index_params=base)
    elif isinstance(inner, faiss.IndexPreTransform):
        sub = _params_for(inner.index, chosen, knobs=knobs, keep=keep)
        params = swig.SearchParametersPreTransform(index_params=sub)
    elif isinstance(inner, faiss.IndexIVF):
        nprobe = knobs.nprobe if knobs.nprobe is not None else inner.nprobe
        params = swig.SearchParametersIVF(nprobe=int(min(nprobe, inner.nlist)))
    elif isinstance(inner, faiss.IndexHNSW):
        ef = knobs.ef_search if knobs.ef_search is not None else inner.hnsw.efSearch
        params = swig.SearchParametersHNSW(efSearch=int(ef))
    else:
        params = swig.SearchParameters()
    if chosen is not None:
        params.sel = chosen
    keep.append(params)
    return params
