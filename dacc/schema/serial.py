"""JSON round-trip for typed dataclasses: no pickle anywhere in dacc's own formats.

`from_dict` reads data from files a user may have been handed, so for any malformed input it
raises ValueError (its callers turn that into a DaccError) and never a TypeError, KeyError or
RecursionError; its messages print values through `short_repr`, never in full.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from dacc.schema.errors import short_repr

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _key(where: str, k: Any) -> str:
    # a key that is not plain printable text (a newline, a quote) is shown by its repr: an error
    # message stays one line whatever the manifest holds
    plain = isinstance(k, str) and len(k) <= 60 and k.isprintable() and "'" not in k
    return f"{where}.{k}" if plain else f"{where}[{short_repr(k, 40)}]"


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in get_args(tp)):
            raise ValueError(f"{where}: {short_repr(value)} is not one of {get_args(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        (inner, *_) = get_args(tp) or (Any,)
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, inner = get_args(tp) or (Any, Any)
        for k in value:
            if key_tp is str and not isinstance(k, str):  # JSON keys are strings; anything else is forged
                raise ValueError(f"{where}: key {short_repr(k, 40)} is not a string")
        return {k: _convert(inner, v, _key(where, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp in (int, float) and isinstance(value, bool):  # bool is an int subclass, never a count or size
        raise ValueError(f"{where}: expected {tp.__name__}, got bool")
    if tp is float and isinstance(value, int):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> tuple[dict, dict]:
    """Type hints and fields of a dataclass, resolved once (get_type_hints is slow)."""
    return get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from JSON data; unknown or missing fields are errors (ValueError)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints, fields = _schema(cls)
    unknown = [k for k in data if not (isinstance(k, str) and k in fields)]
    if unknown:  # keys of any type: shown by a bounded repr, never sorted (mixed types do not compare)
        shown = ", ".join(short_repr(k, 40) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(f"{where or cls.__name__}: unknown field(s) {shown}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where or cls.__name__}: missing field '{name}'")
    return cls(**kwargs)
