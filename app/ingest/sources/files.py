"""Server files as members: paths confined to the allowed folders, folders walked in name order,
files judged before they are opened (links out of the folders, anything but a regular file, a
file over the size cap) and judged again once open."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from app.core.errors import FolderNotAllowed, InvalidRequest, MemberRejected, PathOutsideRoot
from app.ingest.sources.base import DRIVE, KIND_NAMES, Member, skipped, too_large


def confine(path: Path, roots: list[Path] | None) -> Path:
    """``path`` resolved; with ``roots`` (requests over HTTP) it must lie inside one of them once
    links are resolved, so neither ``..`` nor a symlink can reach outside."""
    if roots is None:
        return path.resolve()
    if not roots:
        raise FolderNotAllowed("importing server files is off: set CBIR_IMPORT_ROOTS to allow some")
    if not path.is_absolute():
        raise InvalidRequest(f"give an absolute path under {', '.join(map(str, roots))}")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a link loop, a NUL byte
        resolved = None
    if resolved is None or not within(resolved, roots):
        # the same answer whether it exists or not: the API does not probe the file system
        raise PathOutsideRoot(
            f"{str(path)[:200]!r} is not under the allowed roots ({', '.join(map(str, roots))})"
        )
    return resolved


def in_root(roots: dict[str, Path], name: str, path: str) -> Path:
    """``path`` (relative) inside the import root called ``name``, as an absolute path for
    ``check_folder``. Absolute paths and ``..`` are refused, also when %-encoded (a client that
    encoded twice), before the file system is asked anything."""
    if not roots:
        raise FolderNotAllowed("importing server files is off: set CBIR_IMPORT_ROOTS to allow some")
    root = roots.get(name)
    if root is None:
        raise InvalidRequest(f"no import root is called {name[:64]!r}; the roots are {sorted(roots)}")
    forms, form = [path], path
    for _ in range(3):  # %252e%252e is %2e%2e is ..
        form = unquote(form)
        forms.append(form)
    for form in forms:
        pure = PurePosixPath(form.replace("\\", "/"))
        if "\x00" in form or pure.is_absolute() or DRIVE.match(form) or ".." in pure.parts:
            raise PathOutsideRoot(f"{path[:200]!r} leaves the import root {name!r}")
    return root / path


def within(path: Path, roots: tuple[Path, ...] | list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def folder_files(folder: Path) -> Iterator[tuple[str, Path, OSError | None]]:
    """(relative name, path, None) of every entry below ``folder`` but folders, in name order (the
    order of sorted paths); hidden entries skipped; links, to folders too, listed and never
    followed. A subfolder that cannot be listed comes as (name, path, the error)."""
    stack = [("", iter(_listing(folder)))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = prefix + entry.name
        if skipped(name):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        if not is_dir:
            yield name, Path(entry.path), None
            continue
        try:
            stack.append((f"{name}/", iter(_listing(Path(entry.path)))))
        except OSError as exc:
            yield name, Path(entry.path), exc


def _listing(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda e: e.name)


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)[:300]


def file_member(
    name: str, path: Path, *, inside: tuple[Path, ...], metadata: dict[str, Any], max_bytes: int
) -> Member | None:
    """A server file as a member, judged before it is opened: a path outside ``inside``, or a link
    that leads there, is rejected and never followed, as is anything but a regular file (a FIFO
    would block a reader). A link to a folder gives None: its files are listed where they lie."""
    if not within(Path(os.path.normpath(path)), inside):
        return Member(name, reject=("path_outside_root", "the path leaves the allowed folders"))
    try:
        linked = path.is_symlink()
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL byte
        return Member(name, reject=("file_unreadable", _why(exc)))
    if not within(real, inside):
        return Member(
            name, reject=("symlink_outside_root", "a link out of the allowed folders is not followed")
        )
    try:
        info = real.stat()
    except (OSError, ValueError) as exc:  # gone, or a dangling link
        return Member(name, reject=("file_unreadable", _why(exc)))
    if stat.S_ISDIR(info.st_mode) and linked:
        return None
    if not stat.S_ISREG(info.st_mode):
        what = KIND_NAMES.get(stat.S_IFMT(info.st_mode), "a folder")
        return Member(name, reject=("not_a_regular_file", f"{what}: only regular files are imported"))
    if reason := too_large(info.st_size, max_bytes):
        return Member(name, reject=reason)
    return Member(name, metadata, read=lambda: _read_file(real, max_bytes=max_bytes))


def _read_file(path: Path, *, max_bytes: int) -> bytes:
    """A server file's bytes. It was judged when listed but may have changed since: opened
    without following a link or blocking on a FIFO, and judged again once open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MemberRejected("file_unreadable", "the file went away before it was read") from None
    except OSError as exc:
        raise MemberRejected("file_unreadable", _why(exc)) from None
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MemberRejected("not_a_regular_file", "no longer a regular file when opened")
        data = handle.read(max_bytes + 1)
    if reason := too_large(len(data), max_bytes):
        raise MemberRejected(*reason)
    return data


def capped(members: Iterable[Member | None], *, limit: int) -> Iterator[Member]:
    """``members`` (None ones dropped), the one after the first ``limit`` rejected as
    ``limit_reached`` and the rest not listed."""
    count = 0
    for member in members:
        if member is None:
            continue
        if count == limit:
            yield Member(
                member.name,
                reject=(
                    "limit_reached",
                    f"the folder holds more than {limit} files (CBIR_MAX_FOLDER_FILES): "
                    "this one and those after it are not imported",
                ),
            )
            return
        count += 1
        yield member


def folder_entry(
    name: str, path: Path, problem: OSError | None, *, inside: Path, metadata: dict[str, Any], max_bytes: int
) -> Member | None:
    if problem is not None:
        return Member(name, reject=("file_unreadable", f"the folder cannot be listed: {_why(problem)}"))
    return file_member(name, path, inside=(inside,), metadata=metadata, max_bytes=max_bytes)
