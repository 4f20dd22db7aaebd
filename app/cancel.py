"""Cancellation of long work: a token the work checks between batches, set by whoever wants it
to stop (the client disconnected, a job was cancelled, the service is shutting down)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from app.errors import Cancelled

Progress = Callable[[int, int], None]  # (done, total)


class CancelToken:
    """Thread-safe; ``check()`` raises ``Cancelled`` once ``cancel()`` was called on this token or
    on its ``parent`` (the runner's shutdown token, say)."""

    def __init__(self, parent: CancelToken | None = None) -> None:
        self._event = threading.Event()
        self._reason = ""
        self.parent = parent

    def cancel(self, reason: str) -> None:
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self.parent is not None and self.parent.cancelled)

    @property
    def reason(self) -> str:
        if self._event.is_set():
            return self._reason
        return self.parent.reason if self.parent is not None else ""

    def check(self) -> None:
        """Raise ``Cancelled`` (saying why) when the work should stop."""
        if self.cancelled:
            raise Cancelled(f"stopped: {self.reason}")


NEVER = CancelToken()  # for callers with nothing to cancel (the CLI): never set


def checking(progress: Progress | None, token: CancelToken) -> Progress:
    """A progress callback that first checks ``token``: work that reports its progress between
    batches stops at the next batch once the token is set."""

    def report(done: int, total: int) -> None:
        token.check()
        if progress is not None:
            progress(done, total)

    return report
