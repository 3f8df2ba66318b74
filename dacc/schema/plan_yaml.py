"""Reading a plan file's YAML safely: a plan is a small tree of plain keys and values, so anything
beyond that is refused before it can cost time, memory or recursion.

Order matters: the byte size is checked first, then the text is decoded, then the *event stream*
(`yaml.parse`, which is iterative) is checked for depth, anchors, aliases and tags. Only a stream
that passed is composed and constructed (which recurse and, with aliases, can expand
exponentially: the "billion laughs" bomb), with duplicate keys refused on the way.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dacc.schema.errors import DaccError, clip, short_repr

MAX_BYTES = 64 * 1024  # a full plan is well under 2 KiB; 64 KiB leaves room for long step masks
MAX_DEPTH = 32  # the deepest real plan is 4 levels (cache.options.scm_mask[...])
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # text has tabs and newlines, not these
_MERGE = "tag:yaml.org,2002:merge"
_FIX_SYNTAX = "write the plan as plain YAML keys and values; see README.md 'Plan file'"
# libyaml when present: the pure-Python scanner looks up to 1024 tokens ahead for a possible simple
# key, quadratically, so `[[[[...` costs it ~0.25 s before the depth limit can stop it (libyaml: 2 ms).
_BASE: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


Lines = dict[tuple, int]  # key path ("cache", "options", "Fn") -> 1-based line


def read_plan_data(path: str | Path) -> tuple[Any, Lines]:
    """The plain data (dicts, lists, scalars) of the YAML plan at `path` and the line of each key,
    or a DaccError."""
    path = Path(path)
    if not path.is_file():
        raise DaccError(f"plan file '{path}' does not exist", str(path), "pass an existing YAML file to --plan")
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)  # never read more than the limit, whatever the file's size
    return parse_plan_yaml(raw, str(path))


def parse_plan_yaml(raw: bytes | str, source: str = "<plan>") -> tuple[Any, Lines]:
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > MAX_BYTES:
        raise DaccError(f"the plan file is larger than {MAX_BYTES // 1024} KiB", source,
                        "a plan is a few lines of YAML; pass the plan file, not another file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DaccError(f"the plan file is not UTF-8 text (undecodable byte at offset {exc.start}); "
                        "it looks like a binary file", source, "pass a YAML text file to --plan") from None
    bad = _CONTROL.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise DaccError(f"the plan file contains the control character {bad.group()!r}; it looks like a "
                        "binary file", f"{source}:{line}", "pass a YAML text file to --plan")
    try:
        _check_events(text, source)
        loader = _PlanLoader(text)
        loader.plan_source = source
        try:
            node = loader.get_single_node()  # safe now: shallow, alias-free
            if node is None:
                return None, {}
            lines: Lines = {}
            _key_lines(node, (), lines)
            return loader.construct_document(node), lines
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "nesting depth" in problem:  # libyaml >= 0.2.6 stops at 1000 levels while scanning ahead
            raise DaccError(f"the plan is nested deeper than {MAX_DEPTH} levels", where, _FIX_SYNTAX) from None
        raise DaccError(f"plan file is not valid YAML ({clip(problem)})", where,
                        "fix the YAML syntax at that line") from None


def _check_events(text: str, source: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_BASE):
        line = f"{source}:{event.start_mark.line + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise DaccError("YAML anchors and aliases (&name, *name) are not allowed in a plan", line,
                            "write each value out in full")
        if getattr(event, "tag", None) is not None:  # only set when written: !!int, !!binary, !!python/...
            raise DaccError(f"YAML tags ({short_repr(event.tag, 40)}) are not allowed in a plan", line,
                            "remove the tag and write the plain value")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise DaccError(f"the plan is nested deeper than {MAX_DEPTH} levels", line, _FIX_SYNTAX)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _key_lines(node: yaml.Node, path: tuple, out: Lines) -> None:
    """Record where each key is written, so errors about it can name the line (recursion is bounded
    by MAX_DEPTH, checked before composing)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                out.setdefault(path + (key_node.value,), key_node.start_mark.line + 1)
                _key_lines(value_node, path + (key_node.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _key_lines(item, path + (i,), out)


class _PlanLoader(_BASE):  # type: ignore[misc, valid-type]
    """SafeLoader that refuses duplicate keys and merge keys (`<<`), naming the key and its line."""

    plan_source = "<plan>"

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # `0x_`, `2001-02-30`, a 5000-digit int: PyYAML raises raw
            raise DaccError(f"cannot read the value {short_repr(node.value)} ({clip(str(exc), 80)})",
                            f"{self.plan_source}:{node.start_mark.line + 1}", _FIX_SYNTAX) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE:
                raise DaccError("YAML merge keys (<<) are not allowed in a plan", f"{self.plan_source}:{line}",
                                "write the keys out in full")
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                raise DaccError(f"a plan key must be a plain name, got {short_repr(key)}",
                                f"{self.plan_source}:{line}", _FIX_SYNTAX) from None
            if first is not None:
                raise DaccError(f"duplicate key {short_repr(key)} (first given on line {first})",
                                f"{self.plan_source}:{line}", "keep one of them") from None
            seen[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads `1e9` and `1.0e9` as strings, unlike YAML 1.2 and every other reader a
# user would check a plan with; a threshold written that way is a number.
_PlanLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
