"""Canonical graph text: one op per line, deterministic, diffable.

    input  %hidden_states : f32[s0, s1, 16]
    %linear = aten.linear(%hidden_states, @x_embedder.weight, @x_embedder.bias)  # f32[s0, s1, 32] | seg=prologue linear
    output (%reshape_7)

Parameters print as `@fqn`, symbols use the canonical names `s0, s1, ...` of the inputs, no
addresses or object ids appear, and dacc's annotations trail each line after `|`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.schema.dtypes import dtype_text


def _target(node: Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.name().split("::", 1)
        name = name.removesuffix(".default")
        return f"{ns}.{name}"
    return getattr(t, "__name__", str(t))


def _arg(ir: ProgramIR, a: Any) -> str:
    if isinstance(a, Node):
        return f"@{ir.param_of[a.name]}" if ir.is_param(a) else f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(ir, x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return dtype_text(a)
    if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
        return str(a)
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, (torch.SymInt, torch.SymFloat)):
        return str(ir.expr(a))
    return repr(a)


def _annotation(ir: ProgramIR, node: Node) -> str:
    info = ir.info(node)
    parts = []
    if info.segment:
        parts.append(f"seg={info.segment}")
    if info.gate:
        parts.append(f"gate={info.gate}")
    if info.role:
        detail = " ".join(f"{k}={v}" for k, v in sorted(info.detail.items()) if k != "weight")
        parts.append(f"{info.role}({detail})" if detail else info.role)
    return " | " + " ".join(parts) if parts else ""


def print_graph(ir: ProgramIR) -> str:
    lines = []
    for node in ir.graph.nodes:
        if node.op == "placeholder":
            if ir.is_param(node):
                continue  # parameters are named inline as @fqn
            lines.append(f"input  %{node.name} : {ir.type_text(node)}")
        elif node.op == "output":
            lines.append("output (" + ", ".join(_arg(ir, a) for a in node.args[0]) + ")")
        else:
            args = [_arg(ir, a) for a in node.args]
            args += [f"{k}={_arg(ir, v)}" for k, v in node.kwargs.items()]
            ty = ir.type_text(node)
            lines.append(f"%{node.name} = {_target(node)}({', '.join(args)})"
                         f"{'  # ' + ty if ty else ''}{_annotation(ir, node)}")
    return "\n".join(lines) + "\n"
