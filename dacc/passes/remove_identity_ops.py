"""Remove ops that return their input unchanged: full-range slices (`x[:, ...]`), `.to()` to the
dtype/layout/device the tensor already has, `.contiguous()` of a tensor that already is, and
`aten.alias`. Each costs a dispatcher round trip per step for nothing, and the `.to()` ones pin
the device the model was traced on.

Only when the graph mutates nothing: then a view and its base are interchangeable for readers.
"""
from __future__ import annotations

import sys

import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.schema.plan import Plan

aten = torch.ops.aten


def _val(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def _is_identity(node: Node) -> bool:
    t, args, kw = node.target, node.args, node.kwargs
    src, out = _val(args[0]) if args else None, node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if src.dtype != out.dtype or src.device != out.device or tuple(src.shape) != tuple(out.shape):
        return False
    if t is aten.slice.Tensor:
        dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
        return start in (0, None) and (end is None or (isinstance(end, int) and end >= sys.maxsize)) and step == 1
    if t in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default):
        return t is not aten._to_copy.default and not kw.get("copy", False) and kw.get("memory_format") is None
    if t is aten.contiguous.default:
        return src.is_contiguous()
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
