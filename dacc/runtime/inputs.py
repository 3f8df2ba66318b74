"""Flattening forward kwargs into the leaf order of a compiled program (shared with the compiler)."""
from __future__ import annotations

from typing import Any, Iterator


def flatten_with_paths(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of nested dicts/lists/tuples with dotted paths; None is a leaf (as in torch.export)."""
    return list(_walk(value, prefix))


def _walk(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, value
