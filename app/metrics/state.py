"""What ``GET /metrics`` reads at scrape time: jobs by kind and state, images and indexed vectors per
collection. Two grouped queries and the in-memory sizes of the indexes this process serves."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.data.db import Database
from app.data.records import CollectionRecord, ImageRecord, JobRecord

log = logging.getLogger(__name__)


class IndexSizes(Protocol):
    def sizes(self) -> dict[int, int]: ...  # collection id -> vectors in its served index


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            "cbir_jobs",
            "Jobs in the database by kind and state, every process's (import, reembed, evaluate, whiten)",
            labels=["kind", "state"],
        ),
        GaugeMetricFamily("cbir_collection_images", "Images stored per collection", labels=["collection"]),
        GaugeMetricFamily(
            "cbir_collection_vectors",
            "Vectors in the index this process serves per collection (absent until it is first served)",
            labels=["collection"],
        ),
        GaugeMetricFamily(
            "cbir_state_up",
            "1 when this scrape could read the database, else 0 (then the gauges above are absent)",
        ),
    )


class StateCollector(Collector):
    def __init__(self, *, db: Database, indexes: IndexSizes) -> None:
        self.db = db
        self.indexes = indexes

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from _families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs, images, vectors, up = _families()
        try:
            with self.db.session() as session:
                job_rows = session.execute(
                    select(JobRecord.kind, JobRecord.state, func.count()).group_by(
                        JobRecord.kind, JobRecord.state
                    )
                ).all()
                collections = session.execute(
                    select(CollectionRecord.id, CollectionRecord.name, func.count(ImageRecord.id))
                    .outerjoin(ImageRecord, ImageRecord.collection_id == CollectionRecord.id)
                    .group_by(CollectionRecord.id, CollectionRecord.name)
                    .order_by(CollectionRecord.name)
                ).all()
        except SQLAlchemyError as exc:  # the request metrics are worth the most exactly then
            log.warning("metrics: the database could not be read (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        for kind, state, count in sorted(job_rows):
            jobs.add_metric([kind, state], count)
        sizes = self.indexes.sizes()
        for collection_id, name, count in collections:
            images.add_metric([name], count)
            if collection_id in sizes:
                vectors.add_metric([name], sizes[collection_id])
        up.add_metric([], 1)
        yield from (jobs, images, vectors, up)
