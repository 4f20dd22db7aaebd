"""Content-addressed image files: ``images/ab/<sha256>.<ext>`` under the data folder."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.core.errors import CbirError, InsufficientStorage, ReadOnly

log = logging.getLogger(__name__)

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# "No room": the disk, a quota, or the process's file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_fault(exc: BaseException) -> CbirError | None:
    """What a client is told when a write failed because the storage is full (507) or read-only
    (503); None for any other error."""
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return InsufficientStorage(
            f"the server's storage is full ({os.strerror(exc.errno)}); nothing of this request was "
            "kept: retry once space is freed"
        )
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return ReadOnly("the server's data folder is read-only; searches still work, writes do not")
    return None


class WriteGate:
    """Whether this process may write. Closed for good with CBIR_READ_ONLY; closed for
    ``retry_after`` seconds when a write finds the file system read-only (then the next write
    tries again, so a data folder remounted read-write heals without a restart)."""

    def __init__(self, *, read_only: bool = False, retry_after: float = 30.0) -> None:
        self.read_only = read_only
        self.retry_after = retry_after
        self._tripped_at: float | None = None
        self._reason = ""

    @property
    def closed(self) -> bool:
        tripped = self._tripped_at
        return self.read_only or (tripped is not None and time.monotonic() - tripped < self.retry_after)

    def check(self) -> None:
        """Raise ``ReadOnly`` (503) while writes are off."""
        if self.read_only:
            raise ReadOnly("the service runs read-only (CBIR_READ_ONLY): searches work, writes do not")
        if self.closed:
            raise ReadOnly(f"the data folder was found read-only ({self._reason}); searches still work")

    def trip(self, reason: str) -> None:
        if not self.closed:
            log.error("data folder read-only (%s): refusing writes for %.0f s", reason, self.retry_after)
        self._reason = reason
        self._tripped_at = time.monotonic()


@contextmanager
def storage_faults(gate: WriteGate | None = None) -> Iterator[None]:
    """Raise a full or read-only storage's OSError as InsufficientStorage or ReadOnly (closing
    ``gate`` on a read-only file system); any other error passes unchanged."""
    try:
        yield
    except OSError as exc:
        fault = storage_fault(exc)
        if fault is None:
            raise
        if isinstance(fault, ReadOnly) and gate is not None:
            gate.trip(str(exc))
        raise fault from exc


# Temporary names: ``.<name>.<pid>-<token>-<n>.tmp`` (``ImageStore.discard`` finds ``.<name>.*.tmp``);
# the token tells apart processes with the same id on other machines sharing the folder.
_TMP_TOKEN = uuid.uuid4().hex[:8]
_tmp_numbers = itertools.count()


def write_atomic(path: Path, data: bytes, *, fsync: bool = True, make_parent: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: readers never see a torn file.

    Plain ``os`` calls rather than ``tempfile.mkstemp`` and a file object: a bulk import writes
    thousands of small files, and their Python overhead held the GIL against the writer."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        tmp = f"{path.parent}/.{path.name}.{os.getpid()}-{_TMP_TOKEN}-{next(_tmp_numbers)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:  # left by a killed process that had our id: take the next name
            continue
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileJournal:
    """Names the image files a writer is about to store before the rows that refer to them commit.

    Each process writes its own journal and holds an exclusive lock on it while it lives; the
    kernel drops the lock when the process dies, however it dies. On start, a journal whose lock
    can be taken belonged to a dead process: its files are checked against the database and
    those without a row removed, so a kill -9 mid-import leaves no orphan file behind.
    """

    def __init__(self, path: Path, *, handle: int | None = None) -> None:
        self.path = path
        self._fd = handle
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, str]] = Counter()

    @classmethod
    def open(cls, folder: Path) -> FileJournal:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.journal"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, handle=fd)

    @staticmethod
    def orphaned(folder: Path) -> list[FileJournal]:
        """Journals of processes that are gone (their lock is free); each is now locked by us."""
        found = []
        for path in sorted(folder.glob("*.journal")) if folder.is_dir() else []:
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process holds it
                os.close(fd)
                continue
            found.append(FileJournal(path, handle=fd))
        return found

    @staticmethod
    def is_held(path: Path) -> bool:
        """Whether a live process holds this journal (its owner is alive)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def note(self, entries: list[tuple[str, str]]) -> None:
        """Record (sha256, format) pairs durably before their files are written."""
        if self._fd is None or not entries:
            return
        with self._lock:
            self._pending.update(entries)
            os.write(self._fd, "".join(f"{sha} {fmt}\n" for sha, fmt in entries).encode())
            os.fsync(self._fd)

    def settle(self, entries: list[tuple[str, str]]) -> None:
        """Forget entries whose rows committed (or whose files were checked): the journal keeps
        only what is still in flight (other batches of this process may be)."""
        if self._fd is None or not entries:
            return
        with self._lock:
            self._pending.subtract(entries)
            self._pending = +self._pending  # drop zero counts
            os.ftruncate(self._fd, 0)
            if self._pending:
                lines = "".join(f"{sha} {fmt}\n" for (sha, fmt), n in self._pending.items() for _ in range(n))
                os.write(self._fd, lines.encode())
            os.fsync(self._fd)

    @property
    def pending(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._pending.elements())

    def entries(self) -> list[tuple[str, str]]:
        if self._fd is None:
            return []
        with open(self.path, encoding="ascii", errors="replace") as handle:
            pairs = [line.split() for line in handle]
        return [(p[0], p[1]) for p in pairs if len(p) == 2 and p[1] in EXTENSIONS]

    def clear(self) -> None:
        if self._fd is not None:
            with self._lock:
                self._pending.clear()
                os.ftruncate(self._fd, 0)

    def close(self, *, remove: bool = True) -> None:
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


class ImageStore:
    """Stores each distinct image once, named by its SHA-256; collections may share a file."""

    def __init__(
        self, root: Path, *, journal: FileJournal | None = None, gate: WriteGate | None = None
    ) -> None:
        self.root = root
        self.journal = journal or FileJournal(root / "unjournalled")  # a no-op journal
        self.gate = gate or WriteGate()
        # Folders known to exist: a mkdir per file cost as much as writing the file (bulk imports).
        self._folders: set[Path] = set()

    def path_for(self, sha256: str, image_format: str) -> Path:
        """Where the file is: ``ab/<sha256>.<ext>`` (256 folders), or the two-level layout of
        data folders written before it (``ab/cd/<sha256>.<ext>``)."""
        path = self._path(sha256, image_format)
        if not path.exists():
            old = self._old_path(sha256, image_format)
            if old.exists():
                return old
        return path

    def _path(self, sha256: str, image_format: str) -> Path:
        # One level of 256 folders: a folder per file pair (65,536 of them) made each new file
        # cost a mkdir as well, doubling the file system work of a bulk import.
        return self.root / sha256[:2] / f"{sha256}.{EXTENSIONS[image_format]}"

    def _old_path(self, sha256: str, image_format: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.{EXTENSIONS[image_format]}"

    def put(self, data: bytes, *, sha256: str, image_format: str, fsync: bool = True) -> Path:
        """Write the file once (``write_atomic``: the seam the disk-fault tests patch); a full or
        read-only disk raises InsufficientStorage or ReadOnly, and leaves no partial file."""
        self.gate.check()
        path = self._path(sha256, image_format)
        with storage_faults(self.gate):
            if path.parent not in self._folders:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._folders.add(path.parent)
            if not path.exists() and not self._old_path(sha256, image_format).exists():
                try:
                    write_atomic(path, data, fsync=fsync, make_parent=False)
                except FileNotFoundError:  # the folder was removed behind our back
                    self._folders.discard(path.parent)
                    write_atomic(path, data, fsync=fsync)
        return path

    def read(self, sha256: str, image_format: str) -> bytes:
        return self.path_for(sha256, image_format).read_bytes()

    def delete(self, sha256: str, image_format: str) -> None:
        self._path(sha256, image_format).unlink(missing_ok=True)
        self._old_path(sha256, image_format).unlink(missing_ok=True)

    def discard(self, sha256: str, image_format: str) -> int:
        """Remove a file and any temporary file a killed write left beside it; 1 if the file was
        there."""
        removed = 0
        for path in (self._path(sha256, image_format), self._old_path(sha256, image_format)):
            for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else []:
                tmp.unlink(missing_ok=True)
            try:
                path.unlink()
                removed = 1
            except FileNotFoundError:
                pass
        return removed
