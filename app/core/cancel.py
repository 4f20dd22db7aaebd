"""Cancellation of long work: a token the work checks between batches, set by whoever wants it
to stop (the client disconnected, a job was cancelled, the service is shutting down)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from app.core.errors import Cancelled
from app.core.faults import delay_point

Progress = Callable[[int, int], None]  # (done, total)
# Asked now and then by a token whose cancel may come from elsewhere (another replica marked the
# job cancelled in the database): a reason to stop, or None.
Probe = Callable[[], str | None]
PROBE_INTERVAL_S = 1.0


class CancelToken:
    """Thread-safe; ``check()`` raises ``Cancelled`` once ``cancel()`` was called on this token or
    on its ``parent`` (the runner's shutdown token, say), or once its ``probe`` gave a reason.

    ``settle()`` is the work's last check before it makes its result permanent: after it the
    token can no longer be cancelled (``cancel()`` answers False), so a job that a cancel was
    accepted for never ends ``succeeded``."""

    def __init__(self, parent: CancelToken | None = None, *, probe: Probe | None = None) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._settled = False
        self.parent = parent
        self._probe = probe
        self._probed_at = time.monotonic()

    def cancel(self, reason: str) -> bool:
        """Ask the work to stop; False when it has settled already (it will finish)."""
        with self._lock:
            if self._settled:
                return False
            if self._reason is None:
                self._reason = reason
            return True

    @property
    def cancelled(self) -> bool:
        return bool(self.reason)

    @property
    def reason(self) -> str:
        with self._lock:
            if self._reason is not None or self._settled:
                return self._reason or ""
        if self._probe is not None and time.monotonic() - self._probed_at >= PROBE_INTERVAL_S:
            self._probed_at = time.monotonic()
            found = self._probe()
            if found:
                self.cancel(found)
                return self.reason
        return self.parent.reason if self.parent is not None else ""

    def check(self) -> None:
        """Raise ``Cancelled`` (saying why) when the work should stop."""
        delay_point("cancel_check")  # a test seam: holds the work open between two batches
        if self.cancelled:
            raise Cancelled(f"stopped: {self.reason}")

    def settle(self) -> None:
        """The last check: ``Cancelled`` if the work should stop, else no cancel is taken after."""
        self.check()
        with self._lock:
            if self._reason is not None:
                raise Cancelled(f"stopped: {self._reason}")
            self._settled = True


class _Never(CancelToken):
    """A token nobody can set: for callers with nothing to cancel (the CLI). It holds no state,
    so one instance serves every caller."""

    def __init__(self) -> None:  # no lock, no parent: nothing to share between callers
        self.parent = None

    def cancel(self, reason: str) -> bool:
        raise TypeError("NEVER is never cancelled: give the work a CancelToken of its own")

    @property
    def reason(self) -> str:
        return ""

    def check(self) -> None:
        return None

    def settle(self) -> None:
        return None


NEVER: CancelToken = _Never()


def checking(progress: Progress | None, token: CancelToken) -> Progress:
    """A progress callback that first checks ``token``: work that reports its progress between
    batches stops at the next batch once the token is set."""

    def report(done: int, total: int) -> None:
        token.check()
        if progress is not None:
            progress(done, total)

    return report
