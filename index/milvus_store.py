"""The vector store in Milvus, through pymilvus's ``MilvusClient``: one Milvus collection per space
(a cbir collection and embedder version), with ``label`` and ``created`` as scalar fields so that
filters run inside Milvus.

Index kinds are FAISS factory strings (the ones cbir already speaks) mapped onto Milvus index types:
``Flat`` -> FLAT, ``HNSW{M}`` -> HNSW, ``IVF{n},Flat`` -> IVF_FLAT, ``IVF{n},SQ8`` -> IVF_SQ8,
``IVF{n},PQ{m}[x{bits}]`` -> IVF_PQ. Anything else (PCA or OPQ in front, a refinement behind, 4- or
6-bit scalar codes, fast-scan PQ, HNSW over codes) has no Milvus counterpart and is refused with
``UnsupportedKind``, as is IVF_PQ on milvus-lite, which cannot build it (it fails only when a segment
is sealed, long after the collection was created, so it is refused up front from the server version).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from index.factories import check_factory
from index.rows import as_ids, as_vectors
from index.search_params import SearchKnobs
from index.store import SpaceMissing, UnsupportedKind, Where, check_rows, empty_hits

__all__ = ["MILVUS_KINDS", "MilvusStore", "milvus_index", "milvus_search_params", "parse_milvus_url"]

MILVUS_KINDS = "Flat, HNSW{M} (or HNSW{M},Flat), IVF{nlist},Flat, IVF{nlist},SQ8, IVF{nlist},PQ{m}[x{bits}]"
LABEL_MAX = 512  # VARCHAR bytes; the catalog's values are shorter (app/catalog/filters.py)
_WRITE_BATCH = 4096
_ID_LIST_BATCH = 16_384
_HNSW_EF_CONSTRUCTION = 40  # as index.kinds, so that both backends build the same graph
_HNSW_EF_SEARCH = 64
_IVF_NPROBE = 16
_EF_MAX = 32_768  # Milvus's bound on HNSW's ef
_LITE_LACKS = frozenset({"IVF_PQ"})
_KIND_PROPERTY = "cbir.kind"
_NOT_FOUND = 100  # Milvus's status code for a collection that does not exist


def milvus_index(kind: str, *, dim: int | None) -> tuple[str, dict[str, int], dict[str, int]]:
    """(Milvus index type, build params, search params) for a FAISS factory string, or
    ``UnsupportedKind``. The string is first checked by cbir's own grammar (``index.factories``)."""
    try:
        body = check_factory(kind, dim=dim).removeprefix("IDMap2,")
    except ValueError as exc:
        raise UnsupportedKind(str(exc)) from None
    if body == "Flat":
        return "FLAT", {}, {}
    if match := re.fullmatch(r"HNSW(\d+)(?:,Flat)?", body):
        return "HNSW", {"M": int(match[1]), "efConstruction": _HNSW_EF_CONSTRUCTION}, {"ef": _HNSW_EF_SEARCH}
    if match := re.fullmatch(r"IVF(\d+),(Flat|SQ8)", body):
        kind_name = "IVF_FLAT" if match[2] == "Flat" else "IVF_SQ8"
        return kind_name, {"nlist": int(match[1])}, {"nprobe": _IVF_NPROBE}
    if match := re.fullmatch(r"IVF(\d+),PQ(\d+)(?:x(\d+))?", body):
        params = {"nlist": int(match[1]), "m": int(match[2]), "nbits": int(match[3] or 8)}
        return "IVF_PQ", params, {"nprobe": _IVF_NPROBE}
    raise UnsupportedKind(f"{body!r} has no Milvus index type; the Milvus store builds {MILVUS_KINDS}")


def milvus_search_params(kind: str, *, k: int, knobs: SearchKnobs | None = None) -> dict[str, int]:
    """Milvus search ``params`` for a space of ``kind`` answering ``k`` per query with the
    collection's ``knobs``: HNSW ``ef`` = max(ef_search, k) (Milvus wants ef >= k); IVF ``nprobe``
    (at most the space's nlist); nothing for FLAT. A knob left None takes the default of
    ``index.kinds`` (ef 64, nprobe 16). milvus-lite accepts these and ignores them."""
    index_type, build, params = milvus_index(kind, dim=None)
    if index_type == "HNSW":
        ef = knobs.ef_search if knobs is not None and knobs.ef_search is not None else params["ef"]
        return {"ef": min(max(int(ef), int(k)), _EF_MAX)}
    if "nprobe" in params:
        nprobe = knobs.nprobe if knobs is not None and knobs.nprobe is not None else params["nprobe"]
        return {"nprobe": max(1, min(int(nprobe), build["nlist"]))}
    return {}


def parse_milvus_url(url: str) -> dict[str, Any]:
    """``milvus://HOST:PORT`` or ``http(s)://HOST:PORT``, optionally ``?token=...&db=...``, as
    ``MilvusClient`` keyword arguments (``uri``, ``token``, ``db_name``)."""
    parts = urlsplit(url)
    if parts.scheme not in {"milvus", "http", "https"} or not parts.hostname:
        raise ValueError(f"not a Milvus address: {url!r} (want milvus://HOST:PORT or http://HOST:PORT)")
    scheme = "http" if parts.scheme == "milvus" else parts.scheme
    query = parse_qs(parts.query)
    out: dict[str, Any] = {"uri": f"{scheme}://{parts.netloc}"}
    if "token" in query:
        out["token"] = query["token"][0]
    if "db" in query:
        out["db_name"] = query["db"][0]
    return out


def _literal(value: str) -> str:
    # Milvus expression strings take JSON's escapes; a label can hold quotes or backslashes.
    return json.dumps(value, ensure_ascii=False)


def _expr(where: Where | None, allowed: np.ndarray | None) -> str:
    terms: list[str] = []
    if where is not None and where.labels is not None:
        named = [label for label in where.labels if label is not None]
        either = []
        if named:
            either.append(f"label in [{', '.join(_literal(label) for label in named)}]")
        if None in where.labels:
            either.append("label is null")
        terms.append(f"({' or '.join(either)})" if either else "false")
    if where is not None and where.created_from is not None:
        terms.append(f"created >= {int(where.created_from)}")
    if where is not None and where.created_until is not None:
        terms.append(f"created < {int(where.created_until)}")
    if allowed is not None:
        terms.append(f"id in [{', '.join(str(int(i)) for i in allowed)}]")
    return " and ".join(terms)


def _kind_of(described: dict[str, Any]) -> str:
    """The kind of a described collection: its property, else its description's, else Flat."""
    kind = (described.get("properties") or {}).get(_KIND_PROPERTY)
    if kind:
        return str(kind)
    try:
        return str(json.loads(described.get("description") or "{}").get("cbir_kind", "Flat"))
    except (ValueError, AttributeError):
        return "Flat"


class MilvusStore:
    """``index.store.VectorStore`` in a Milvus server (or milvus-lite's). ``consistency`` is each
    collection's Milvus consistency level: ``Strong`` by default, so that a write is seen by the
    next search and count from any replica (``Bounded`` is cheaper and lags by about a second)."""

    backend = "milvus"

    def __init__(
        self,
        uri: str,
        *,
        token: str | None = None,
        db_name: str | None = None,
        timeout: float = 10.0,
        consistency: str = "Strong",
    ) -> None:
        # dedicated: a channel of this store's own, closed with it; pymilvus would otherwise share one
        # per address across clients of the process, whose recovery after a server's GOAWAY (idle
        # keepalive pings) can fail the next client's start
        kwargs: dict[str, Any] = {"uri": uri, "timeout": timeout, "dedicated": True}
        if token:
            kwargs["token"] = token
        if db_name:
            kwargs["db_name"] = db_name
        self._client = MilvusClient(**kwargs)
        self._consistency = consistency
        self._lacks: frozenset[str] | None = None
        self._specs: dict[str, tuple[int, str]] = {}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> MilvusStore:
        return cls(**parse_milvus_url(url), **kwargs)

    @property
    def server_version(self) -> str:
        return str(self._client.get_server_version())

    def _server_lacks(self) -> frozenset[str]:
        if self._lacks is None:
            self._lacks = _LITE_LACKS if self.server_version.startswith("milvus_lite") else frozenset()
        return self._lacks

    def check_kind(self, kind: str, *, dim: int | None) -> None:
        index_type, _, _ = milvus_index(kind, dim=dim)
        if index_type in self._server_lacks():
            raise UnsupportedKind(
                f"this Milvus server ({self.server_version}) cannot build {index_type}; use another kind"
            )

    def create(self, space: str, *, dim: int, kind: str = "Flat") -> None:
        self.check_kind(kind, dim=dim)
        index_type, params, _ = milvus_index(kind, dim=dim)
        if self._client.has_collection(space):
            raise ValueError(f"space {space!r} exists")
        # The kind travels with the collection, so that any replica knows how to search it: in a
        # collection property (milvus-lite keeps no schema description) and in the description.
        schema = self._client.create_schema(
            auto_id=False, enable_dynamic_field=False, description=json.dumps({"cbir_kind": kind})
        )
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("label", DataType.VARCHAR, max_length=LABEL_MAX, nullable=True)
        schema.add_field("created", DataType.INT64)
        index_params = self._client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
        self._client.create_collection(
            space,
            schema=schema,
            index_params=index_params,
            consistency_level=self._consistency,
            properties={_KIND_PROPERTY: kind},
        )

    def exists(self, space: str) -> bool:
        return bool(self._client.has_collection(space))

    @contextmanager
    def _named(self, space: str) -> Iterator[None]:
        """Milvus's "collection does not exist" as ``SpaceMissing`` (another process may have dropped
        it): what this client remembered of it is forgotten."""
        try:
            yield
        except MilvusException as exc:
            if exc.code != _NOT_FOUND:
                raise
            self._specs.pop(space, None)
            raise SpaceMissing(space) from None

    def forget(self, space: str | None = None) -> None:
        """Forget the (dim, kind) read of ``space`` (of every space: None): the next call reads it
        from Milvus again, as another replica may have recreated the space in another kind."""
        if space is None:
            self._specs.clear()
        else:
            self._specs.pop(space, None)

    def _spec(self, space: str) -> tuple[int, str]:
        """(dim, kind) of ``space``, read once from Milvus (until ``forget`` or a drop)."""
        spec = self._specs.get(space)
        if spec is None:
            with self._named(space):
                described = self._client.describe_collection(space)
            dims = [int(f["params"]["dim"]) for f in described["fields"] if f["name"] == "vector"]
            kind = _kind_of(described)
            spec = self._specs[space] = (dims[0], kind)
        return spec

    def _dim(self, space: str) -> int:
        return self._spec(space)[0]

    def dim_of(self, space: str) -> int:
        return self._spec(space)[0]

    def kind_of(self, space: str) -> str:
        return self._spec(space)[1]

    def spaces(self) -> list[str]:
        """The spaces (Milvus collections, not their aliases)."""
        return sorted(str(name) for name in self._client.list_collections())

    def upsert(
        self,
        space: str,
        *,
        ids: Any,
        vectors: Any,
        labels: Sequence[str | None] | None = None,
        created: Any | None = None,
    ) -> None:
        rows = check_rows(ids=ids, vectors=vectors, labels=labels, created=created, dim=self._dim(space))
        for label in rows.labels:
            if label is not None and len(label.encode()) > LABEL_MAX:
                raise ValueError(f"a label is longer than {LABEL_MAX} bytes: {label[:40]!r}...")
        for start in range(0, rows.ids.size, _WRITE_BATCH):
            stop = start + _WRITE_BATCH
            data = [
                {"id": int(i), "vector": v.tolist(), "label": label, "created": int(c)}
                for i, v, label, c in zip(
                    rows.ids[start:stop],
                    rows.vectors[start:stop],
                    rows.labels[start:stop],
                    rows.created[start:stop],
                    strict=True,
                )
            ]
            with self._named(space):
                self._client.upsert(space, data=data)

    def delete(self, space: str, ids: Any) -> None:
        id_arr = np.unique(as_ids(ids))
        for start in range(0, id_arr.size, _WRITE_BATCH):
            with self._named(space):
                self._client.delete(space, ids=[int(i) for i in id_arr[start : start + _WRITE_BATCH]])

    def search(
        self,
        space: str,
        queries: Any,
        k: int,
        *,
        where: Where | None = None,
        allowed_ids: Any | None = None,
        knobs: SearchKnobs | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")
        arr = as_vectors(queries, self._dim(space))
        scores, found = empty_hits(arr.shape[0], int(k))
        allowed = None if allowed_ids is None else np.unique(as_ids(allowed_ids))
        if arr.shape[0] == 0 or (allowed is not None and allowed.size == 0):
            return scores, found
        params = milvus_search_params(self._spec(space)[1], k=int(k), knobs=knobs)
        with self._named(space):
            results = self._client.search(
                space,
                data=arr.tolist(),
                limit=int(k),
                filter=_expr(where, allowed),
                output_fields=["id"],
                search_params={"metric_type": "IP", "params": params},
            )
        for row, hits in enumerate(results):
            for col, hit in enumerate(hits):
                found[row, col] = int(hit["id"])
                scores[row, col] = float(hit["distance"])
        return scores, found

    def count(self, space: str) -> int:
        with self._named(space):
            result = self._client.query(space, filter="", output_fields=["count(*)"])
        return int(result[0]["count(*)"])

    def list_ids(self, space: str) -> np.ndarray:
        chunks: list[np.ndarray] = []
        with self._named(space):
            iterator = self._client.query_iterator(
                space, batch_size=_ID_LIST_BATCH, filter="", output_fields=["id"]
            )
            try:
                while batch := iterator.next():
                    chunks.append(np.fromiter((row["id"] for row in batch), dtype=np.int64, count=len(batch)))
            finally:
                iterator.close()
        return np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.int64)

    def flush(self, space: str) -> None:
        """Seal what was written (after a bulk load): milvus-lite searches unsealed rows by brute force,
        730 ms a query at 50,000 x 128 against 25 ms once flushed. Real Milvus seals on its own;
        flushing there after every small write only makes small segments."""
        with self._named(space):
            self._client.flush(space)

    def point(self, alias: str, space: str) -> None:
        """Make ``alias`` name ``space`` (a Milvus alias, created or switched in one call): searches
        and writes through ``alias`` reach ``space`` from then on, in every replica."""
        if not self._client.has_collection(space) or self.target(space) is not None:
            raise SpaceMissing(space)
        if self.target(alias) is not None:
            self._client.alter_alias(space, alias)
        elif self._client.has_collection(alias):
            raise ValueError(f"alias {alias!r} conflicts with a space")
        else:
            self._client.create_alias(space, alias)
        self.forget(alias)

    def target(self, alias: str) -> str | None:
        """The space ``alias`` names, or None when it is no alias."""
        # Asked of the list first: describing a name that is no alias has pymilvus log an error.
        if alias not in self._client.list_aliases().get("aliases", []):
            return None
        try:
            return str(self._client.describe_alias(alias)["collection_name"])
        except MilvusException as exc:
            if exc.code == _NOT_FOUND:
                return None  # dropped meanwhile
            raise

    def drop(self, space: str) -> None:
        """Drop ``space``; given an alias, the alias and the space it names; a space's aliases go
        with it (Milvus refuses to drop a collection that an alias names)."""
        self.forget(space)
        target = self.target(space)
        if target is not None:
            self._client.drop_alias(space)
            self.forget(target)
            space = target
        if self._client.has_collection(space):
            for alias in self._client.list_aliases(space).get("aliases", []):
                self._client.drop_alias(alias)
                self.forget(alias)
            self._client.drop_collection(space)

    def close(self) -> None:
        self._client.close()


__all__ += ["MilvusException"]  # what a caller catches for a server that is away or refuses
