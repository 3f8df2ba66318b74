"""The default dynamic-shape spec, and the input sizes it cannot keep dynamic.

By default every dim of every tensor input is `Dim.AUTO`. torch.export then discovers relations
between sizes by itself; most make two dims share one symbol, which dacc serves as it is. Some
make an input's size an expression of another's: Stable Audio's rotary table has `tokens + 1`
rows, HunyuanDiT's second text mask `14 - s3` columns. The runtime checks every input dim as a
constant or one symbol, so such a *derived* dim is traced again as static (the dims it depends on
follow as far as the relation forces them); every other dim stays dynamic.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.export import Dim, ExportedProgram

from dacc.runtime.inputs import flatten_with_paths

_FRAME_RE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>[^\n]*)')


@dataclass(frozen=True)
class DerivedDim:
    path: str  # input path, "rotary_embedding.0"
    dim: int
    size: str  # "hidden_states.shape[2] + 1"
    first_use: str | None  # "file:line: code" of the first op reading the input

    def describe(self) -> str:
        use = f" (first used at {self.first_use})" if self.first_use else ""
        return f"input '{self.path}' dim {self.dim} has size {self.size}{use}"


def auto_dynamic(kwargs: dict[str, Any], static: dict[str, set[int]] | None = None) -> dict[str, Any]:
    """Dim.AUTO on every dim of every tensor input, except the `static` dims per input path."""
    static = static or {}

    def spec(v: Any, path: str) -> Any:
        if isinstance(v, torch.Tensor):
            keep = static.get(path, set())
            return tuple(Dim.STATIC if d in keep else Dim.AUTO for d in range(v.dim())) if v.dim() else None
        if isinstance(v, dict):  # paths as in flatten_with_paths
            return {k: spec(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x, f"{path}.{i}" if path else str(i)) for i, x in enumerate(v))
        return None
    return {k: spec(v, k) for k, v in kwargs.items()}


def _user_placeholders(ep: ExportedProgram) -> list[torch.fx.Node]:
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [by_name[n] for n in names]


def _first_use(node: torch.fx.Node) -> str | None:
    """The model source line of the first op that reads `node` (the innermost frame of its stack)."""
    for user in node.graph.nodes:
        if node in user.all_input_nodes and user.meta.get("stack_trace"):
            frames = list(_FRAME_RE.finditer(user.meta["stack_trace"]))
            if frames:
                f = frames[-1]
                return f"{f['file']}:{f['line']}: {f['code'].strip()}"
    return None


def derived_input_dims(ep: ExportedProgram, kwargs: dict[str, Any]) -> list[DerivedDim]:
    """Input dims whose traced size is an expression of other sizes rather than a constant or a
    symbol of its own, each with the sizes it is derived from named by input and dim."""
    leaves = flatten_with_paths(kwargs)
    nodes = _user_placeholders(ep)
    names: dict[sympy.Symbol, str] = {}
    for (path, _), node in zip(leaves, nodes):
        for d, size in enumerate(getattr(node.meta.get("val"), "shape", ())):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                names.setdefault(size.node.expr, f"{path}.shape[{d}]")
    out = []
    for (path, _), node in zip(leaves, nodes):
        for d, size in enumerate(getattr(node.meta.get("val"), "shape", ())):
            if isinstance(size, torch.SymInt) and not isinstance(size.node.expr, (sympy.Symbol, sympy.Integer)):
                expr = size.node.expr
                text = str(expr.xreplace({s: sympy.Symbol(names.get(s, str(s))) for s in expr.free_symbols}))
                out.append(DerivedDim(path, d, text, _first_use(node)))
    return out
