"""User text and metadata: checked before anything is stored, made servable when read.

Metadata is the JSON object a client attaches to an image (an upload's ``metadata`` part, a
manifest row). Whatever is stored must come back out through every reader: SQL JSON functions
(SQLite's ``json_extract``, PostgreSQL's ``->>``), the UTF-8 response encoder, the job report. So,
on every path (single upload, manifests, archive and folder imports), before anything is stored:

- numbers are finite, integers fit int64 (SQL's bigint), a number's text has at most
  ``MAX_NUMBER_CHARS`` characters (never a 5,000-digit conversion);
- containers nest at most ``MAX_DEPTH`` levels (the metadata object is level 1);
- every string and key is UTF-8 text without NUL: no lone surrogate (which ``"\\ud800"`` in JSON
  becomes) and no NUL (PostgreSQL cannot extract ``\\u0000`` as text);
- ``label`` is a string, a number or null: it is compared, grouped and shown as text.

File and member names obey the same text rule. Rows an older version stored without these
checks are served through ``servable`` (and rewritten on start by
app/catalog/metadata_repair.py).
"""

from __future__ import annotations

import json
import math
from typing import Any

from app.core.errors import BadMetadata, BadName

MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
REPLACEMENT = "\ufffd"
LABEL_TYPES = (str, int, float)


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored (a lone surrogate, a NUL), or None."""
    if "\x00" in text:
        return "holds a NUL character"
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        if "\udc80" <= char <= "\udcff":
            # How Python keeps a byte that does not decode (surrogateescape): multipart parts
            # (app/api/forms.py), tar and folder names. The offset counts bytes as they came.
            offset = len(text[: exc.start].encode("utf-8", "surrogateescape"))
            return f"is not UTF-8: byte 0x{ord(char) - 0xDC00:02X} at offset {offset} does not decode"
        return f"holds a lone surrogate (U+{ord(char):04X}), which is not UTF-8 text"
    return None


def printable(text: str) -> str:
    """``text`` with each lone surrogate and NUL replaced by U+FFFD (storable and servable)."""
    if text_problem(text) is None:
        return text
    return "".join(REPLACEMENT if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in text)


def check_name(name: str | None, *, what: str = "the file name") -> None:
    """BadName unless ``name`` is UTF-8 text without NUL."""
    if name is not None and (problem := text_problem(name)) is not None:
        raise BadName(f"{what} {printable(name)[:200]!r} {problem}")


# -- JSON text ------------------------------------------------------------------------------------
def _constant(name: str) -> Any:
    raise BadMetadata(f"{name} is not a finite number: JSON has no NaN or Infinity")


def _int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_CHARS:
        raise BadMetadata(f"the number {digits[:20]}... has {len(digits)} digits: {_RANGE}")
    return _bounded(int(digits))


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise BadMetadata(
            f"the number {text[:20]}... is written with {len(text)} characters; "
            f"at most {MAX_NUMBER_CHARS} are read"
        )
    value = float(text)
    if not math.isfinite(value):
        raise BadMetadata(f"the number {text} is not a finite number (too large for a float)")
    return value


_RANGE = f"integers must lie within int64 ({INT64_MIN} to {INT64_MAX})"


def _bounded(value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadMetadata(f"the number {str(value)[:24]} is too large: {_RANGE}")
    return value


def parse_json(text: str) -> Any:
    """``json.loads`` refusing what cannot be stored (BadMetadata): NaN and Infinity, numbers
    past int64 or too long to read, nesting the parser cannot follow. Text that is not JSON at
    all raises ``json.JSONDecodeError``. The depth limit is ``check_metadata``'s."""
    try:
        return json.loads(text, parse_constant=_constant, parse_int=_int, parse_float=_float)
    except RecursionError:  # thousands of levels: far past MAX_DEPTH
        raise BadMetadata(_too_deep("metadata")) from None


def _too_deep(what: str) -> str:
    return f"{what} is nested more than {MAX_DEPTH} levels deep (the depth limit)"


# -- values ---------------------------------------------------------------------------------------
def check_metadata(metadata: Any, *, what: str = "metadata") -> dict[str, Any]:
    """``metadata`` itself if every rule of this module holds; BadMetadata saying where not."""
    if not isinstance(metadata, dict):
        raise BadMetadata(f"{what} must be a JSON object, not {type(metadata).__name__}")
    if "label" in metadata:
        label = metadata["label"]
        if label is not None and (isinstance(label, bool) or not isinstance(label, LABEL_TYPES)):
            raise BadMetadata(f"{what} 'label' must be a string, a number or null, not {_json_type(label)}")
    # Iterative: a value nested thousands deep (from Python, not JSON) costs no recursion.
    stack: list[tuple[Any, int, str]] = [(metadata, 1, what)]
    while stack:
        node, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise BadMetadata(_too_deep(what))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(node, dict):
                if not isinstance(key, str):
                    raise BadMetadata(f"{where} has a key that is not text: {key!r:.40}")
                if (problem := text_problem(key)) is not None:
                    raise BadMetadata(f"a key of {where} {problem}: {printable(key)[:40]!r}")
            place = f"{where}[{printable(key)[:40]!r}]" if isinstance(key, str) else f"{where}[{key}]"
            if isinstance(value, dict | list | tuple):
                stack.append((value, depth + 1, place))
            else:
                _check_scalar(value, place)
    return metadata


def _check_scalar(value: Any, place: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if (problem := text_problem(value)) is not None:
            raise BadMetadata(f"{place} {problem}")
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise BadMetadata(f"{place} is a number too large: {_RANGE}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadMetadata(f"{place} is {value}, not a finite number: JSON has no NaN or Infinity")
    else:
        raise BadMetadata(f"{place} is not a JSON value ({type(value).__name__})")


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", dict: "an object", list: "an array"}
    return names.get(type(value), type(value).__name__)


# -- reading what an older version stored -----------------------------------------------------------
SERVED_DEPTH = 64  # deeper stored containers are served as null (nothing stores them any more)


def servable(value: Any, *, depth: int = 0) -> Any:
    """A stored metadata value as it can be served: NaN and infinity as null, lone surrogates
    and NUL in text (keys too) as U+FFFD, containers past ``SERVED_DEPTH`` as null."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict | list):
        if depth >= SERVED_DEPTH:
            return None
        if isinstance(value, list):
            return [servable(v, depth=depth + 1) for v in value]
        return {printable(str(k)): servable(v, depth=depth + 1) for k, v in value.items()}
    return value
