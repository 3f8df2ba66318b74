"""The one error type dacc raises for bad input: what went wrong, where, and how to fix it."""
from __future__ import annotations


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
