"""The source protocol: what every import source kind provides, and what its members are.

A source lists its members in a fixed order, so that position ``n`` always names the same file:
an interrupted job resumes at its high-water mark by skipping the first ``n`` members without
reading them. A member that cannot be imported (a link, an unsafe name, a file over the size
limit) is listed with a reason code and never read.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol, Self

SKIPPED_FOLDER = "__MACOSX"
DRIVE = re.compile(r"^[A-Za-z]:")
KIND_NAMES = {
    stat.S_IFLNK: "a link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


@dataclass(frozen=True)
class Limits:
    """What one import may read (CBIR_MAX_* settings); the defaults are the settings' defaults."""

    member_bytes: int = 20 * 1024 * 1024  # an archive member, inflated
    members: int = 1_000_000  # entries of an archive
    total_bytes: int = 8 * 1024 * 1024 * 1024  # all members of an archive, inflated
    ratio: float = 100.0  # inflated / compressed, per zip member of more than RATIO_FLOOR bytes
    folder_files: int = 1_000_000  # files of a server folder

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(
            member_bytes=min(settings.max_member_bytes, settings.max_upload_bytes),
            members=settings.max_archive_members,
            total_bytes=settings.max_total_uncompressed,
            ratio=settings.max_compression_ratio,
            folder_files=settings.max_folder_files,
        )


@dataclass
class Member:
    """One file of a source. ``read`` returns its bytes; a member with ``reject`` set is reported
    with that (code, detail) and never read."""

    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    read: Callable[[], bytes] | None = None
    reject: tuple[str, str] | None = None


@dataclass(frozen=True)
class Reading:
    """What listing a source's members may use: the size cap of one file, the folders of the
    built-in datasets, the import limits, and where known the service's settings (URL fetching
    needs them) and a callback that learns the member count once a reader finds it."""

    max_bytes: int
    data_dir: Path
    datasets_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    settings: Any = None
    on_total: Callable[[int], None] | None = None

    @classmethod
    def of(cls, settings: Any, *, on_total: Callable[[int], None] | None = None) -> Reading:
        return cls(
            max_bytes=settings.max_upload_bytes,
            data_dir=settings.data_dir,
            datasets_dir=settings.datasets_dir,
            limits=Limits.of(settings),
            settings=settings,
            on_total=on_total,
        )


class Source(Protocol):
    """One kind of import source. ``kind`` is the name stored in a job's parameters; ``params``
    and ``from_params`` turn a source into JSON and back, so that a job resumes after a restart."""

    kind: ClassVar[str]

    def params(self, *, data_dir: Path) -> dict[str, Any]:
        """The JSON parameters (beside ``"source": kind``) that rebuild this source."""
        ...

    @classmethod
    def from_params(cls, params: dict[str, Any], *, data_dir: Path) -> Self: ...

    def members(self, reading: Reading) -> Iterator[Member]:
        """The members in their fixed order."""
        ...

    def count(self, reading: Reading) -> int | None:
        """How many members ``members`` lists, without reading any (None when it cannot tell).
        May raise what reading the source raises."""
        ...

    def uploads(self) -> list[Path]:
        """Files the service keeps for this source until its job ends (then deleted)."""
        return []


def _parts(name: str) -> tuple[str, ...]:
    """``PurePosixPath(name).parts``, without building a path for a plain relative name (a
    bulk import asks this of every member)."""
    if name.startswith("/"):
        return PurePosixPath(name).parts
    return tuple(p for p in name.split("/") if p and p != ".")


def label_from(name: str) -> dict[str, Any]:
    """The label of a file named ``name``: its parent folder's name, when it has one."""
    parts = _parts(name)
    return {"label": parts[-2]} if len(parts) >= 2 else {}


def skipped(name: str) -> bool:
    """macOS forks and hidden files or folders. Judged per path part, so "./cat/1.png" (tar of
    ".") is kept and "../evil.png" is left for the safety check to reject."""
    parts = _parts(name)  # "." parts are dropped here, ".." parts kept
    return not parts or parts[0] == SKIPPED_FOLDER or any(p.startswith(".") and p != ".." for p in parts)


def too_large(size: int, limit: int) -> tuple[str, str] | None:
    return ("image_too_large", f"{size} bytes; the limit is {limit}") if size > limit else None
