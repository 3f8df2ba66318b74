"""What the partition passes share: inserting dacc's communication ops into an exported graph,
rebuilding sizes as graph values, and re-deriving every node's shape afterwards.

Sizes are symbolic (canonical `s0, s1, ...`), so a shard changes shapes exactly: a value of
`s1` tokens becomes `s1//2` on each of two ranks, and every node after it says so. Which dims
are sequence or batch dims is read from these expressions, never from names.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import sympy
import torch
from torch.fx import Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._sympy.functions import FloorDiv

from dacc.compiler.ir import ProgramIR
from dacc.compiler.segments import segment_kind, segment_of
from dacc.schema.errors import DaccError

aten = torch.ops.aten
INNER_KINDS = ("block", "probe", "transition")  # what runs between the prologue and the epilogue


def is_inner(ir: ProgramIR, node: Node) -> bool:
    seg = segment_of(ir, node)
    return seg is not None and segment_kind(seg) in INNER_KINDS


def label(ir: ProgramIR, node: Node, segment: str) -> Node:
    info = ir.info(node)
    info.segment = segment
    ir.set_info(node, info)
    return node


class SizeEmitter:
    """Graph values for size expressions over the program's symbols: each symbol is read once
    with `sym_size` from the input that carries it."""

    def __init__(self, ir: ProgramIR, before: Node, segment: str):
        self.ir, self.before, self.segment = ir, before, segment
        names = {n.name: n for n in ir.graph.nodes if n.op == "placeholder"}
        paths = [s.path for s in ir.traced.inputs]
        self.source = {s.name: (names[ir.user_inputs[paths.index(s.input)]], s.dim) for s in ir.symbol_specs()}
        self.made: dict[str, Node] = {}

    def _node(self, target: Callable, args: tuple) -> Node:
        with self.ir.graph.inserting_before(self.before):
            node = self.ir.graph.call_function(target, args)
        return label(self.ir, node, self.segment)

    def emit(self, expr: sympy.Expr) -> Any:
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        key = str(expr)
        if key in self.made:
            return self.made[key]
        if isinstance(expr, sympy.Symbol):
            if expr.name not in self.source:
                raise DaccError(f"size {expr} is no input dimension", "partition")
            node = self._node(aten.sym_size.int, self.source[expr.name])
        elif isinstance(expr, (sympy.Add, sympy.Mul)):
            op = operator.add if isinstance(expr, sympy.Add) else operator.mul
            args = [self.emit(a) for a in expr.args]
            node = args[0]
            for a in args[1:]:
                node = self._node(op, (node, a))
        elif isinstance(expr, FloorDiv):
            node = self._node(operator.floordiv, (self.emit(expr.args[0]), self.emit(expr.args[1])))
        else:
            raise DaccError(f"cannot rebuild the size {expr} in the graph", "partition",
                            "report this model: its sizes use an operation the partition passes do not know")
        self.made[key] = node
        return node


def terms(expr: sympy.Expr) -> list[sympy.Expr]:
    return list(sympy.Add.make_args(sympy.expand(expr)))


def insert_op(ir: ProgramIR, before: Node, op: Any, args: tuple, segment: str) -> Node:
    with ir.graph.inserting_before(before):
        node = ir.graph.call_function(op, args)
    return label(ir, node, segment)


def redirect(ir: ProgramIR, old: Node, new: Node, keep: Callable[[Node], bool]) -> None:
    """Users of `old` for which `keep(user)` is False read `new` instead (`new` itself keeps
    reading `old`); the output signature follows when the output node moves. The cache gate's
    value names are renamed separately (`ProgramIR.rename_gate_value`)."""
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and not keep(user))
    if any(u.op == "output" for u in new.users):
        ir.rename_output(old.name, new.name)


def repropagate(ir: ProgramIR, divided: set[sympy.Symbol], world: int) -> None:
    """Every node's `val` again from its inputs, under the program's fake mode and shape env, so
    the shapes after a shard are the local ones (and later passes, the printer and the saved
    program agree with what runs).

    Shapes are evaluated at the example's sizes. A local size of 1 (a batch of 2 split over two
    ranks) would make torch specialize it to the constant 1, and the program would serve nothing
    else; so the example sizes of the `divided` symbols are scaled up together (keeping the
    relations between them) until every local size is at least 2."""
    env = ir.shape_env()
    values = getattr(env, "backed_var_to_val", None)
    values = env.var_to_val if values is None else values
    canonical = {v: k for k, v in ir.symbols.items()}
    originals = [canonical[s.name] for s in divided if s.name in canonical]
    hints = {s: int(values[s]) for s in originals if s in values}
    scale = 1
    while any(h * scale // world < 2 for h in hints.values()):
        scale += 1
    for sym, hint in hints.items():
        values[sym] = sympy.Integer(hint * scale)
    placeholders = [n for n in ir.graph.nodes if n.op == "placeholder"]
    # the example sizes also live in each input's symbolic sizes and strides
    sym_nodes = [d.node for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)
                 for d in (*n.meta["val"].shape, *n.meta["val"].stride()) if isinstance(d, torch.SymInt)]
    old_hints = [node._hint for node in sym_nodes]
    for node in sym_nodes:
        node._hint = int(node.expr.xreplace(values))
    mode = next(n.meta["val"].fake_mode for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor))
    gm = ir.ep.graph_module
    gm.recompile()
    cache, mode.cache_enabled = mode.cache_enabled, False  # one pass over each node: caching only costs
    # conditions torch assumes while propagating at the scaled sizes (a per-rank size is not 1,
    # say) are about those sizes, not about the program: it runs op by op at any size, and a
    # CFG pair's per-rank batch *is* 1. The program's conditions stay those of its trace, plus
    # the divisibility the partition passes add.
    kept = len(env.guards)
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*(n.meta.get("val") for n in placeholders))
    finally:
        del env.guards[kept:]
        mode.cache_enabled = cache
        for sym, hint in hints.items():
            values[sym] = sympy.Integer(hint)
        for node, hint in zip(sym_nodes, old_hints):
            node._hint = hint


def check_examples(ir: ProgramIR, sizes: list[sympy.Expr], world: int, what: str, fix: str) -> None:
    """Every example the program serves must split: refuse at compile time, naming the size."""
    from dacc.runtime.inputs import flatten_with_paths

    specs = ir.symbol_specs()
    for k, example in enumerate([ir.traced.example, *ir.traced.also_serves]):
        flat = dict(flatten_with_paths(example))
        env = {sympy.Symbol(s.name, integer=True, positive=True): sympy.Integer(int(flat[s.input].shape[s.dim]))
               for s in specs}
        for size in sizes:
            value = sympy.sympify(size).xreplace(env)
            if value.is_Integer and int(value) % world:
                named = {sympy.Symbol(s.name, integer=True, positive=True): sympy.Symbol(f"{s.input}.shape[{s.dim}]")
                         for s in specs}
                raise DaccError(f"{what}: example {k} has {sympy.sympify(size).xreplace(named)} = {int(value)}, "
                                f"not a multiple of {world}", "model file", fix)
