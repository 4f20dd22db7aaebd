"""Which source an import request names: one function for the HTTP route and the command line.

A ``SourceRequest`` is what a client asked for, before anything is looked at: the route builds one
from its JSON body or its uploaded archive, ``cbir import`` from its SOURCE argument.
``choose_source`` checks it and returns the source a job imports (a 4xx error when it is no good).
Requests over HTTP are confined to the import roots (``roots``); the operator's command line is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import InvalidRequest
from app.ingest.sources.archive import check_archive
from app.ingest.sources.base import Limits, Source
from app.ingest.sources.dataset import check_dataset
from app.ingest.sources.files import in_root
from app.ingest.sources.folder import check_folder
from app.ingest.sources.manifest import check_manifest
from app.ingest.sources.urls import check_urls, read_url_list

# The fields of a JSON request that name a source: exactly one is given.
NAMED_BY = ("dataset", "folder", "root", "manifest", "urls")


@dataclass(frozen=True)
class SourceRequest:
    """One of: a built-in dataset and split; a server folder (by path, or by import root name and
    a relative path) with its layout; a server manifest; a list of URLs; an archive (a file here,
    with an optional manifest beside it)."""

    dataset: str | None = None
    split: str = "train"
    folder: str | None = None
    root: str | None = None
    path: str = ""  # with root: the folder under it
    layout: str = "auto"
    manifest: str | None = None
    urls: list[Any] | None = None
    archive: Path | None = None
    archive_name: str = "upload"  # as the client sent it: kept in the job and shown
    archive_manifest: Path | None = None
    archive_manifest_name: str | None = None

    @classmethod
    def named(cls, **fields: Any) -> SourceRequest:
        """A request from JSON fields (those of NAMED_BY, split, path, layout): 422 unless exactly
        one of NAMED_BY is given, or when ``path`` comes without ``root``."""
        wanted = cls(**fields)
        if sum(getattr(wanted, name) is not None for name in NAMED_BY) != 1:
            raise InvalidRequest('give exactly one of "dataset", "folder", "root", "manifest" or "urls"')
        if wanted.path and wanted.root is None:
            raise InvalidRequest('"path" goes with "root" (a folder under that import root)')
        return wanted

    @classmethod
    def from_argument(
        cls, source: str, *, layout: str = "auto", manifest: Path | None = None, urls: bool = False
    ) -> SourceRequest:
        """``cbir import SOURCE``: with ``urls`` a text file of URLs; else a folder, a manifest
        (.csv or .jsonl), an archive (any other file, with ``manifest`` beside it) or
        DATASET[:SPLIT]."""
        path = Path(source)
        if urls:
            return cls(urls=read_url_list(path))
        if path.is_dir():
            return cls(folder=source, layout=layout)
        if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
            return cls(manifest=source)
        if path.is_file():
            return cls(archive=path, archive_name=path.name, archive_manifest=manifest)
        dataset, _, split = source.partition(":")
        return cls(dataset=dataset, split=split or "train")

    @property
    def reads_server_files(self) -> bool:
        """It names files of the server (a folder or a manifest): an admin's request."""
        return self.folder is not None or self.root is not None or self.manifest is not None


def choose_source(
    wanted: SourceRequest,
    *,
    settings: Any,
    roots: list[Path] | None,
    limits: Limits | None = None,
    keep: Callable[[Path, str], Path] | None = None,
) -> Source:
    """The source ``wanted`` names, checked. ``roots``: where server files may lie (None: anywhere,
    the command line). ``limits``: an archive's caps (default: the settings' defaults). ``keep``
    (path, suffix) -> the kept copy: an archive not yet in the uploads folder is checked, then
    copied there with its manifest, since its job deletes its uploads when done."""
    if wanted.archive is not None:
        if keep is None:
            return check_archive(
                wanted.archive,
                wanted.archive_name,
                manifest=wanted.archive_manifest,
                manifest_name=wanted.archive_manifest_name,
                limits=limits,
            )
        check_archive(wanted.archive, wanted.archive_name, limits=limits)  # before copying anything
        kept = keep(wanted.archive, ".archive")
        copy = keep(wanted.archive_manifest, ".manifest") if wanted.archive_manifest is not None else None
        return check_archive(
            kept,
            wanted.archive_name,
            manifest=copy,
            manifest_name=wanted.archive_manifest_name,
            limits=limits,
        )
    if wanted.folder is not None or wanted.root is not None:
        folder = Path(wanted.folder or "")
        if wanted.root is not None:
            folder = in_root(settings.import_root_map, wanted.root, wanted.path)
        return check_folder(folder, roots=roots, layout=wanted.layout)
    if wanted.manifest is not None:
        return check_manifest(Path(wanted.manifest), roots=roots)
    if wanted.urls is not None:
        return check_urls(wanted.urls, settings=settings)
    if wanted.dataset is None:
        raise InvalidRequest('give exactly one of "dataset", "folder", "root", "manifest" or "urls"')
    return check_dataset(wanted.dataset, wanted.split)
