"""Fault seams for the crash-recovery tests: named points where the process can be made to die.

``CBIR_FAULT_CRASH_AT=name`` (or ``name:N``) makes the process SIGKILL itself the first (or Nth)
time it passes ``crash_point(name)``: no handler runs, nothing is flushed, exactly as a kill -9 or a
power cut from the process's point of view. ``CBIR_FAULT_DELAY_AT=name:seconds`` makes
``delay_point(name)`` sleep, to hold open a window (a background index build) a test must observe.
``CBIR_FAULT_FAIL_AT=name`` makes ``fail_point(name)`` raise ``InjectedFault``: an unexpected
error (a bug) where the request handling passes it, to test what a 500 leaves behind.
Both are read once per process; unset, each point costs one function call and a None check.

The points, in the order a write passes them:

- ``after_db_commit_before_faiss_add``: rows and vectors committed, not yet in the index.
- ``after_faiss_add_before_response``: in the index, not yet acknowledged to the client.
- ``during_write_index``: half of an index checkpoint's temporary file written.
- ``after_replace_before_hwm``: the checkpoint file renamed into place (it carries its own
  high-water mark) but neither made durable by the directory fsync nor recorded as saved.
- ``after_hwm``: the checkpoint durable and recorded.
- ``after_db_tombstone_before_remove_ids``: a delete committed, the vector still in the index and
  the file still on disk.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from functools import lru_cache

log = logging.getLogger(__name__)

CRASH_ENV = "CBIR_FAULT_CRASH_AT"
DELAY_ENV = "CBIR_FAULT_DELAY_AT"

CRASH_POINTS = (
    "after_db_commit_before_faiss_add",
    "after_faiss_add_before_response",
    "during_write_index",
    "after_replace_before_hwm",
    "after_hwm",
    "after_db_tombstone_before_remove_ids",
)
# A background index build; each write batch; each budgeted decode, while it holds its
# reservation (app/imaging/decoding.py); each look at a cancellation token, between two batches
# of costly work (compare, evaluation, whitening: app/core/cancel.py).
DELAY_POINTS = ("index_build", "store_batch", "decode", "cancel_check")

FAIL_ENV = "CBIR_FAULT_FAIL_AT"
FAIL_POINTS = ("labels",)  # GET /api/v1/collections/{name}/labels

_lock = threading.Lock()
_passes: dict[str, int] = {}


@lru_cache(maxsize=1)
def _crash_plan() -> tuple[str, int] | None:
    value = os.environ.get(CRASH_ENV, "").strip()
    if not value:
        return None
    name, _, nth = value.partition(":")
    if name not in CRASH_POINTS:
        raise SystemExit(f"{CRASH_ENV}: unknown crash point {name!r}; known: {', '.join(CRASH_POINTS)}")
    try:
        count = int(nth) if nth else 1
    except ValueError:
        raise SystemExit(f"{CRASH_ENV}: {value!r} is not name or name:N") from None
    if count < 1:
        raise SystemExit(f"{CRASH_ENV}: N must be at least 1, not {count}")
    log.warning("fault injection: this process kills itself at %s (pass %d)", name, count)
    return name, count


@lru_cache(maxsize=1)
def _delay_plan() -> tuple[str, float] | None:
    value = os.environ.get(DELAY_ENV, "").strip()
    if not value:
        return None
    name, _, seconds = value.partition(":")
    if name not in DELAY_POINTS:
        raise SystemExit(f"{DELAY_ENV}: unknown delay point {name!r}; known: {', '.join(DELAY_POINTS)}")
    try:
        return name, float(seconds)
    except ValueError:
        raise SystemExit(f"{DELAY_ENV}: {value!r} is not name:seconds") from None


class InjectedFault(RuntimeError):
    """The error ``fail_point`` raises: a stand-in for a bug."""


@lru_cache(maxsize=1)
def _fail_plan() -> str | None:
    name = os.environ.get(FAIL_ENV, "").strip()
    if name and name not in FAIL_POINTS:
        raise SystemExit(f"{FAIL_ENV}: unknown fail point {name!r}; known: {', '.join(FAIL_POINTS)}")
    return name or None


def check() -> None:
    """Fail at start, not at the first write, when a fault variable names no known point."""
    _crash_plan()
    _delay_plan()
    _fail_plan()


def reset() -> None:
    """Read the variables again and forget the passes counted (tests that change them in-process)."""
    _crash_plan.cache_clear()
    _delay_plan.cache_clear()
    _fail_plan.cache_clear()
    with _lock:
        _passes.clear()


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``CBIR_FAULT_CRASH_AT`` names this point (and pass)."""
    plan = _crash_plan()
    if plan is None or plan[0] != name:
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        due = _passes[name] == plan[1]
    if due:
        os.kill(os.getpid(), signal.SIGKILL)


def delay_point(name: str) -> None:
    """Sleep here if ``CBIR_FAULT_DELAY_AT`` names this point."""
    plan = _delay_plan()
    if plan is not None and plan[0] == name:
        time.sleep(plan[1])


def fail_point(name: str) -> None:
    """Raise ``InjectedFault`` here if ``CBIR_FAULT_FAIL_AT`` names this point."""
    if _fail_plan() == name:
        raise InjectedFault(f"fault injection: {FAIL_ENV}={name}")
