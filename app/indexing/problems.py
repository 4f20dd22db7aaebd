"""What keeps a collection's index from serving all it should, as /ready, /health and
``GET /collections/{name}/index`` report it; and the checks of a collection's stored index settings.

No stored row or setting may stop the service from starting: a row the index refuses is set aside
(``vectors_refused``), a factory cbir will not build gives exact search (``bad_index_factory``),
bad search parameters are ignored (``bad_index_params``), and an index that cannot be opened at all
leaves its collection answering 503 (``index_unavailable``) while every other collection serves.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from app.data.records import CollectionRecord
from index import SearchKnobs
from index.factories import normalise_factory
from index.kinds import AUTO, validate_factory

log = logging.getLogger(__name__)

VECTORS_REFUSED = "vectors_refused"
BAD_INDEX_FACTORY = "bad_index_factory"
BAD_INDEX_PARAMS = "bad_index_params"
INDEX_UNAVAILABLE = "index_unavailable"

# An index that could not be opened at all is tried again after this many seconds, not per request.
OPEN_RETRY_S = 30.0
# The search parameters a collection may store, with the bounds the API enforces (IndexConfigIn).
KNOB_BOUNDS: dict[str, tuple[type, float, float]] = {
    "ef_search": (int, 1, 4096),
    "nprobe": (int, 1, 65536),
    "k_factor": (float, 1, 100),
}


@dataclass(frozen=True)
class IndexProblem:
    collection: str
    code: str
    detail: str
    hint: str
    image_ids: tuple[int, ...] = ()  # vectors_refused: the rows set aside, ascending


class FactoryChecks:
    """``validate_factory``'s answers by (factory, dimension). The check has FAISS construct an
    empty index, and ``_maybe_grow`` asks after every write, under the index lock: an upload must
    not pay for that. Owned by the index manager; bounded, since PUT requests check any string."""

    LIMIT = 512

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, int | None], str | ValueError] = {}

    def validate(self, factory: str, *, dim: int | None) -> str:
        """The normalised factory, or ``ValueError`` (kinds.validate_factory)."""
        key = (factory, dim)
        with self._lock:
            answer = self._answers.get(key)
        if answer is None:
            try:
                answer = validate_factory(factory, dim=dim)
            except ValueError as exc:
                answer = exc
            with self._lock:
                if len(self._answers) >= self.LIMIT:
                    self._answers.clear()
                self._answers[key] = answer
        if isinstance(answer, ValueError):
            raise ValueError(str(answer))
        return answer


class IndexProblems:
    """Problems by collection id and code; thread-safe (searches read, builds write)."""

    def __init__(self, *, checks: FactoryChecks | None = None) -> None:
        self.checks = checks or FactoryChecks()
        self._lock = threading.Lock()
        self._problems: dict[int, dict[str, IndexProblem]] = {}
        self._open_failures: dict[int, float] = {}  # collection id -> time.monotonic() of the failure

    def note(self, collection_id: int, problem: IndexProblem | None, *, code: str) -> None:
        """Record ``problem`` under ``code``, or clear ``code`` when ``problem`` is None."""
        with self._lock:
            held = self._problems.setdefault(collection_id, {})
            if problem is None:
                held.pop(code, None)
            else:
                held[code] = problem
            if not held:
                del self._problems[collection_id]

    def get(self, collection_id: int, code: str) -> IndexProblem | None:
        with self._lock:
            return self._problems.get(collection_id, {}).get(code)

    def of(self, collection_id: int) -> list[IndexProblem]:
        with self._lock:
            return sorted(self._problems.get(collection_id, {}).values(), key=lambda p: p.code)

    def all(self) -> list[IndexProblem]:
        with self._lock:
            found = [p for held in self._problems.values() for p in held.values()]
        return sorted(found, key=lambda p: (p.collection, p.code))

    def forget(self, collection_id: int) -> None:
        with self._lock:
            self._problems.pop(collection_id, None)
            self._open_failures.pop(collection_id, None)

    def refused(self, collection: CollectionRecord, refused: dict[int, str]) -> None:
        """Record (or clear) the rows of the collection set aside: image id -> why."""
        if refused:
            shown = sorted(refused)[:10]
            log.error(
                "index of %s: %d stored vector(s) set aside, the index cannot hold them (image ids %s%s)",
                collection.name,
                len(refused),
                ", ".join(f"{i}: {refused[i]}" for i in shown),
                ", ..." if len(refused) > len(shown) else "",
            )
        self.note(collection.id, refused_problem(collection, refused), code=VECTORS_REFUSED)

    def settings(self, collection: CollectionRecord, *, dim: int | None, served: str | None = None) -> None:
        """Record (or clear) what is wrong with the collection's stored kind and search parameters;
        ``served``: the factory of the index file serving it (kept_factory)."""
        checks = (
            (BAD_INDEX_FACTORY, checked_factory(collection, dim=dim, checks=self.checks, served=served)[1]),
            (BAD_INDEX_PARAMS, checked_knobs(collection)[1]),
        )
        for code, problem in checks:
            if problem is not None and self.get(collection.id, code) is None:
                log.error("index of %s: %s", collection.name, problem.detail)
            self.note(collection.id, problem, code=code)

    def may_open(self, collection_id: int) -> bool:
        """False for OPEN_RETRY_S after the collection's index failed to open."""
        with self._lock:
            failed = self._open_failures.get(collection_id)
        return failed is None or time.monotonic() - failed >= OPEN_RETRY_S

    def open_failed(self, collection: CollectionRecord, exc: BaseException) -> None:
        log.error("the index of %s cannot be opened; its searches answer 503", collection.name, exc_info=exc)
        with self._lock:
            self._open_failures[collection.id] = time.monotonic()
        self.note(collection.id, unavailable_problem(collection, exc), code=INDEX_UNAVAILABLE)

    def opened(self, collection_id: int) -> None:
        with self._lock:
            failed = self._open_failures.pop(collection_id, None)
        if failed is not None:
            self.note(collection_id, None, code=INDEX_UNAVAILABLE)

    def forget_ids(self, collection_id: int, ids: Any) -> None:
        """Deleted images leave the list of refused rows (the problem goes with the last one)."""
        gone = {int(i) for i in ids}
        with self._lock:
            held = self._problems.get(collection_id, {})
            problem = held.get(VECTORS_REFUSED)
            if problem is None or not gone.intersection(problem.image_ids):
                return
            left = tuple(i for i in problem.image_ids if i not in gone)
            if left:
                held[VECTORS_REFUSED] = replace(problem, image_ids=left, detail=_refused_detail(left))
            else:
                del held[VECTORS_REFUSED]
                if not held:
                    del self._problems[collection_id]


def _refused_detail(ids: tuple[int, ...], reasons: dict[int, str] | None = None) -> str:
    why = ""
    if reasons:
        counts: dict[str, int] = {}
        for reason in reasons.values():
            key = reason.split(" ", 1)[0]
            counts[key] = counts.get(key, 0) + 1
        why = " (" + ", ".join(f"{n} {key}" for key, n in sorted(counts.items())) + ")"
    return (
        f"{len(ids)} stored vector(s) the index cannot hold{why} are set aside: those images are "
        "not found by search; the collection's other images are"
    )


def refused_problem(collection: CollectionRecord, refused: dict[int, str]) -> IndexProblem | None:
    """The ``vectors_refused`` problem of these set-aside rows (image id -> why), None if none."""
    if not refused:
        return None
    ids = tuple(sorted(refused))
    return IndexProblem(
        collection=collection.name,
        code=VECTORS_REFUSED,
        detail=_refused_detail(ids, refused),
        hint="delete these images (DELETE /api/v1/images/{id}) and upload them again if they are "
        "real images (a constant image is refused with 422 degenerate_image), or restore their "
        "vectors from a good backup and restart",
        image_ids=ids,
    )


def checked_factory(
    collection: CollectionRecord, *, dim: int | None, checks: FactoryChecks, served: str | None = None
) -> tuple[str, IndexProblem | None]:
    """The collection's stored kind (``auto`` or a normalised factory) when cbir builds it, else
    ``Flat`` (exact search) and the ``bad_index_factory`` problem saying why; ``served``, the factory
    of the index file serving the collection, words the problem for a file that is kept."""
    requested = collection.index_factory or AUTO
    if requested.strip().lower() == AUTO:
        return AUTO, None
    try:
        return checks.validate(requested, dim=dim), None
    except ValueError as exc:
        why = f"the stored index factory {requested[:80]!r} is refused: {exc}"
        return "Flat", factory_problem(collection, why, kept=normalise_factory(requested) == served)


def kept_factory(
    collection: CollectionRecord, *, served: str | None, dim: int | None, checks: FactoryChecks
) -> bool:
    """True when the collection's stored kind is one cbir does not build (an older version took
    any string FAISS parsed) and ``served``, the factory of the index file that opened, is exactly
    it: that file keeps serving as it is, rather than being rebuilt into exact search."""
    requested = collection.index_factory
    if served is None or not requested or normalise_factory(requested) != served:
        return False
    return checked_factory(collection, dim=dim, checks=checks)[1] is not None


def factory_problem(collection: CollectionRecord, why: str, *, kept: bool = False) -> IndexProblem:
    """``kept``: an index file of that very kind opened and serves (kept_factory)."""
    outcome = (
        "the index file of that kind opened and serves as it is, but cbir does not rebuild it (a "
        "rebuild, after a lost file or a re-embed, gives exact search)"
        if kept
        else "serving exact search (Flat) instead"
    )
    return IndexProblem(
        collection=collection.name,
        code=BAD_INDEX_FACTORY,
        detail=f"{why}; {outcome}",
        hint=f'set a kind cbir builds: PUT /api/v1/collections/{collection.name}/index {{"factory": "auto"}}',
    )


def checked_knobs(collection: CollectionRecord) -> tuple[SearchKnobs, IndexProblem | None]:
    """The collection's stored search parameters that are valid, and a ``bad_index_params``
    problem naming those that are not (they are ignored)."""
    params = collection.index_params
    if params is None:
        return SearchKnobs(), None
    good: dict[str, Any] = {}
    bad: list[str] = []
    if not isinstance(params, dict):
        bad.append(f"{str(params)[:40]} (not an object)")
        params = {}
    for key, value in params.items():
        if key not in KNOB_BOUNDS:
            bad.append(f"{str(key)[:40]} (unknown)")
            continue
        kind, low, high = KNOB_BOUNDS[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            number
            and (kind is float or isinstance(value, int))
            and math.isfinite(value)
            and low <= value <= high
        ):
            good[key] = value
        else:
            bad.append(
                f"{key}={str(value)[:40]} (a{'n integer' if kind is int else ' number'} {low:g} to {high:g})"
            )
    problem = None
    if bad:
        problem = IndexProblem(
            collection=collection.name,
            code=BAD_INDEX_PARAMS,
            detail=f"stored search parameters ignored: {', '.join(bad)}",
            hint=f"set them again: PUT /api/v1/collections/{collection.name}/index with ef_search, nprobe "
            "or k_factor (null clears one)",
        )
    return SearchKnobs(**good), problem


def unavailable_problem(collection: CollectionRecord, exc: BaseException) -> IndexProblem:
    # /ready is public: the exception's text (it can name server paths) stays in the log.
    return IndexProblem(
        collection=collection.name,
        code=INDEX_UNAVAILABLE,
        detail=f"the index could not be opened or built ({type(exc).__name__}); its searches answer "
        "503 while the other collections serve",
        hint="the server log has the error in full (a disk or permission problem, a file another "
        "program wrote); the service tries again within a minute, or on "
        f"PUT /api/v1/collections/{collection.name}/index",
    )
