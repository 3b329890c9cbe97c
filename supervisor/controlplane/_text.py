"""Text boundaries: every string that reaches the store or the wire is valid Unicode.

Python strings may hold lone surrogates (``"\\udfff"``): JSON's ``\\udfff``
escape decodes to one, and so does ``os.fsdecode`` of bad bytes. Such a
string cannot be encoded as UTF-8, so it cannot be answered over HTTP: a
store that accepted one would fail every later read of it (the server
answered 500 after committing, then every poll, listing and status call
failed). So:

* what comes in (a request body, an argument of a control-plane call) is
  checked with :func:`check_text` and refused with a ``BadRequest`` before
  anything is written;
* what a worker produces from untrusted output (an agent's lines and
  results) is repaired with :func:`scrub_text` (each lone surrogate becomes
  U+FFFD), since refusing it would lose a finished session's outcome.

One function of each kind, used by every entry point, so the rule cannot
drift between the server, the embedded plane and the HTTP client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ._exceptions import BadRequest

__all__ = ["check_text", "has_lone_surrogate", "scrub_text"]

_SURROGATE: Final = re.compile("[\ud800-\udfff]")
#: Deeper than any legitimate value; guards the walk against a cycle.
_MAX_DEPTH: Final = 200


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a code point that UTF-8 cannot encode."""
    # A str never holds a valid surrogate *pair*: those are decoded to one code point.
    return _SURROGATE.search(text) is not None


def scrub_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (the replacement character)."""
    return _SURROGATE.sub("\ufffd", text)


def check_text(value: object, what: str = "value") -> None:
    """Refuse a value holding a string that is not valid Unicode, anywhere inside it.

    Walks strings, mapping keys and values, lists, tuples and sets, and the
    fields of ``attrs`` classes (outcomes, presence reports); anything else is
    left to the caller's own checks.

    Raises:
        BadRequest: naming where the first lone surrogate is (never echoing it).
    """
    found = _find(value, what, 0)
    if found is not None:
        raise BadRequest(f"{found} is not valid Unicode (it holds a lone surrogate)")


def _find(value: object, where: str, depth: int) -> str | None:
    # Runs on every argument of every store call: the path to a value is built
    # only once a bad string is found, and ASCII strings (nearly all) cost one check.
    if isinstance(value, str):
        return where if not value.isascii() and has_lone_surrogate(value) else None
    if depth > _MAX_DEPTH or value is None or isinstance(value, (bool, int, float, bytes)):
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and not key.isascii() and has_lone_surrogate(key):
                return f"a key of {where}"
            if _find(item, "", depth + 1) is not None:
                return _find(item, f"{where}[{key!r}]" if _printable(key) else where, depth + 1)
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            if _find(item, "", depth + 1) is not None:
                return _find(item, f"{where}[{index}]", depth + 1)
        return None
    kind: Any = type(value)
    if attrs.has(kind):
        for field in attrs.fields(kind):
            item = getattr(value, field.name)
            if _find(item, "", depth + 1) is not None:
                return _find(item, f"{where}.{field.name}", depth + 1)
    return None


def _printable(key: object) -> bool:
    return isinstance(key, (str, int)) and len(str(key)) <= 40
