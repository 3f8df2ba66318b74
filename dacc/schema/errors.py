"""The one error type dacc raises for bad input: what went wrong, where, and how to fix it."""
from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


class DaccError(Exception):
    """A user-facing error. `str()` is a single paragraph: cause, location, remedy."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what.rstrip(".") + "."]
        if where:
            parts.append(f"Where: {where}.")
        if fix:
            parts.append(f"Fix: {fix.rstrip('.')}.")
        super().__init__(" ".join(parts))


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() for error messages about untrusted input: bounded in length and in nesting, so a
    huge or deeply nested value neither floods the message nor costs time (or recursion) to print."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ is no reason to lose the real error
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())  # one paragraph: no newlines from multi-line strings
    return text if len(text) <= limit else text[:limit - 3] + "..."


def clip(text: str, limit: int = 120) -> str:
    """A message fragment from a library (which may quote our input) cut to one bounded line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
