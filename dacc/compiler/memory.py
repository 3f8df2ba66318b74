"""Memory one rank needs, per segment, as expressions over the program's symbols: the second part
of the parallel cost model (dacc/compiler/comm.py is the first), recorded in the manifest and
read by `dacc inspect --memory`.

- a segment's *values*: the bytes of what it hands on (its outputs). The runtime keeps every
  value of a call until the call returns, so activations grow segment by segment;
- a segment's *transient* peak: the intermediates alive at once inside it, found by a liveness
  scan in graph order. Views allocate nothing. The peak is taken where it is largest at the
  example's sizes and recorded as that point's sum, which scales with batch and tokens like the
  true peak as long as the segment's shape stays the same;
- a segment's *traffic*: the bytes its ops without FLOPs write and read, for the step-time model;
- a data-dependent size (an unbacked symbol) counts at its upper bound, as for FLOPs;
- weights are counted from the tensors themselves (dacc/report.py adds them up, with FSDP's
  shards and gathers).
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR

aten = torch.ops.aten
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int, aten.t.default,
         aten.expand.default, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim,
         aten.squeeze.default, aten.alias.default, aten.split.Tensor, aten.split_with_sizes.default,
         aten.chunk.default, aten.unbind.int, aten.detach.default, aten.as_strided.default}


def value_bytes(ir: ProgramIR, node: Node) -> sympy.Expr:
    """The bytes of a value (a view handed on keeps its base alive: count it whole)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return sympy.Integer(0)
    return ir.upper_bound(sympy.Mul(*ir.shape(node)) * val.element_size())


def allocated_bytes(ir: ProgramIR, node: Node) -> sympy.Expr:
    """The bytes an op allocates: a view allocates nothing."""
    return sympy.Integer(0) if node.target in VIEWS else value_bytes(ir, node)


def traffic_bytes(ir: ProgramIR, node: Node) -> sympy.Expr:
    """The bytes an op moves through memory: what it writes and what it reads. Views and tuple
    picks move nothing. The step-time model charges it to ops it counts no FLOPs for (the
    elementwise and normalisation work between the matmuls; dacc/cost/step_time.py)."""
    if node.target in VIEWS or node.target is operator.getitem:
        return sympy.Integer(0)
    reads = sum((value_bytes(ir, i) for i in node.all_input_nodes), sympy.Integer(0))
    return allocated_bytes(ir, node) + reads


def transient_peak(ir: ProgramIR, nodes: list[Node], example: dict[sympy.Symbol, int]) -> sympy.Expr:
    inside = set(nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for inp in node.all_input_nodes:
            if inp in inside:
                last_use[inp] = i
    # sizes at the example, summed as the scan goes; the expression is built once, at the peak
    live: dict[Node, sympy.Expr] = {}
    at: dict[Node, int] = {}
    running, best_at, peak = 0, -1, {}
    for i, node in enumerate(nodes):
        live[node] = allocated_bytes(ir, node)
        at[node] = int(live[node].xreplace(example))
        running += at[node]
        if running > best_at:
            best_at, peak = running, dict(live)
        for inp in node.all_input_nodes:
            if last_use.get(inp) == i and inp in live and not any(u not in inside for u in inp.users):
                running -= at.pop(inp)
                del live[inp]
    return sympy.expand(sympy.Add(*peak.values()))


def example_symbols(ir: ProgramIR) -> dict[sympy.Symbol, int]:
    """The program's symbols at the example it was traced with (whole inputs, before any shard)."""
    shapes = ir.traced.example_shapes()
    return {sympy.Symbol(s.name, integer=True, positive=True): shapes[s.input][s.dim] for s in ir.symbol_specs()}
