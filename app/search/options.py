"""A collection's search options: query expansion's depth and weight, as stored with the collection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.data.records import CollectionRecord


@dataclass(frozen=True)
class SearchOptions:
    qe: int = 0  # alpha-QE depth: 0 is off
    qe_alpha: float = 3.0

    @classmethod
    def of(cls, record: CollectionRecord) -> SearchOptions:
        raw = record.search_options or {}
        return cls(qe=int(raw.get("qe", 0)), qe_alpha=float(raw.get("qe_alpha", 3.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"qe": self.qe, "qe_alpha": self.qe_alpha}
