"""Remove ops that return their input unchanged: full-range slices (`x[:, ...]`), `.to()` to the
dtype/layout/device the tensor already has, `.contiguous()` of a tensor that already is, and
`aten.alias`. Each costs a dispatcher round trip per step for nothing, and the `.to()` ones pin
the device the model was traced on.

Only when the graph mutates nothing: then a view and its base are interchangeable for readers.

Sizes are compared with `statically_known_true` only, never with Python `==` on SymInts: `==`
would ask the shape environment, which either records a new guard (narrowing the shapes the
program serves, e.g. `Eq(4, s1//2)` for a slice of a positional table) or, for data-dependent
sizes (`torch.nonzero`), raises. An op whose identity is not provable is simply kept.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch._prims_common import make_contiguous_strides_for
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.schema.plan import Plan

aten = torch.ops.aten


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _known_eq(a: Any, b: Any) -> bool:
    """a == b provably, for every size the program accepts (no guard recorded)."""
    if isinstance(a, Node) or isinstance(b, Node):
        return False  # a size computed in the graph: not known at compile time
    if a is None or b is None:
        return a is b
    return bool(statically_known_true(a == b))


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(_known_eq(x, y) for x, y in zip(a.shape, b.shape))


def _known_contiguous(t: torch.Tensor) -> bool:
    expected = make_contiguous_strides_for(t.shape)
    return all(_known_eq(size, 1) or _known_eq(stride, want)
               for size, stride, want in zip(t.shape, t.stride(), expected))


def _full_range_end(end: Any, size: Any) -> bool:
    if end is None or (isinstance(end, int) and end >= sys.maxsize):
        return True
    return not isinstance(end, Node) and bool(statically_known_true(end >= size))


def _is_identity(node: Node) -> bool:
    t, args, kw = node.target, node.args, node.kwargs
    src, out = _val(args[0]) if args else None, node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if src.dtype != out.dtype or src.device != out.device or not _same_shape(src, out):
        return False
    if t is aten.slice.Tensor:
        dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
        return (start is None or _known_eq(start, 0)) and _full_range_end(end, src.shape[dim]) and _known_eq(step, 1)
    if t in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default):
        return t is not aten._to_copy.default and not kw.get("copy", False) and kw.get("memory_format") is None
    if t is aten.contiguous.default:
        return _known_contiguous(src)
    return t is aten.alias.default


def remove_identity_ops(ir: ProgramIR, plan: Plan) -> PassResult:
    if any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
           for n in ir.graph.nodes):
        return PassResult(False, ["graph mutates tensors: identity ops kept"])
    removed = 0
    for node in list(ir.graph.nodes):
        if node.op == "call_function" and _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            ir.graph.erase_node(node)
            removed += 1
    return PassResult(bool(removed), [f"removed {removed} identity ops"])
