"""A thin layer over one exported program: names, symbolic shapes and dacc annotations per node.

The graph stays a torch.export graph (the passes rewrite it in place); this class only answers
questions about it: which parameter a placeholder is, which module a node came from, what its
shape is as a sympy expression over canonical symbols `s0, s1, ...`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
from torch.export import ExportedProgram
from torch.fx import Node

from dacc.schema.dtypes import dtype_text
from dacc.schema.manifest import CacheGate, InputSpec, NodeInfo, SymbolSpec
from dacc.schema.serial import from_dict, to_dict

_BLOCK_RE = re.compile(r"^(?P<list>.+)\.(?P<index>\d+)$")


@dataclass
class Traced:
    """One exported program and the example inputs it was traced (and verified) with."""
    ep: ExportedProgram
    example: dict[str, Any]
    inputs: list[InputSpec]
    notes: list[str] = field(default_factory=list)  # what the frontend changed to trace it, for the log
    also_serves: list[dict[str, Any]] = field(default_factory=list)  # later examples this program serves

    def example_shapes(self) -> dict[str, list[int]]:
        return {s.path: [int(d) for d in s.shape] for s in self.inputs if s.kind == "tensor"}


class ProgramIR:
    def __init__(self, traced: Traced, smoothing: dict[str, torch.Tensor] | None = None,
                 hessians: dict[str, torch.Tensor] | None = None):
        self.traced = traced
        self.ep = traced.ep
        sig = self.ep.graph_signature
        self.param_of: dict[str, str] = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                                         **sig.inputs_to_lifted_tensor_constants}
        self.user_inputs: list[str] = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
        self.symbols = self._canonical_symbols()
        self.cache_gates: list[CacheGate] = []  # set by the cache-gate passes; disjoint ranges, in order
        self.partition_guards: list[sympy.Basic] = []  # sizes a parallel plan must split evenly
        self.fsdp_units: list | None = None  # set by annotate_fsdp_units (dacc.schema.manifest.FsdpUnit)
        self.fsdp_degree = 1
        self.lowering = None  # set by lower_segments (dacc.compiler.lowering.ProgramLowering)
        # module path -> SmoothQuant factor per input channel (compile.py measures them on sample();
        # quantize_linears folds them into the weights); empty without quantize.smoothing
        self.smoothing: dict[str, torch.Tensor] = smoothing or {}
        # module path -> sum of x x^T of its inputs on sample() (dacc/compiler/gptq.py); quantize_linears
        # rounds those int4 weights by GPTQ; empty with quantize.rounding nearest
        self.hessians: dict[str, torch.Tensor] = hessians or {}
        self.log: Callable[[str], None] = lambda message: None  # progress of long passes

    # -- graph access ---------------------------------------------------------------------
    @property
    def graph(self) -> torch.fx.Graph:
        return self.ep.graph

    def compute_nodes(self) -> list[Node]:
        return [n for n in self.graph.nodes if n.op == "call_function"]

    def is_param(self, node: Node) -> bool:
        return node.op == "placeholder" and node.name in self.param_of

    @staticmethod
    def is_attribute(node: Node) -> bool:
        """A submodule the graph reads as an attribute (the body of a higher-order op such as
        `wrap_with_autocast`): part of the program like a weight, never a value between segments."""
        return node.op == "get_attr"

    def param_tensor(self, node: Node) -> torch.Tensor:
        fqn = self.param_of[node.name]
        return self.ep.state_dict.get(fqn, self.ep.constants.get(fqn))

    def replace_node(self, old: Node, new: Node) -> None:
        """`new` takes `old`'s place everywhere: its users, the program's output signature and the
        cache gate's value names (a rewrite after the cache passes must not orphan them)."""
        old.replace_all_uses_with(new)
        self.rename_output(old.name, new.name)
        self.rename_gate_value(old.name, new.name)
        self.graph.erase_node(old)

    def rename_output(self, old: str, new: str) -> None:
        """The output signature names value `new` where it named `old` (e.g. the final projection)."""
        for spec in self.ep.graph_signature.output_specs:
            if getattr(spec.arg, "name", None) == old:
                spec.arg = type(spec.arg)(new)

    def rename_gate_value(self, old: str, new: str) -> None:
        """The cache gates read and write value `new` where they named `old`."""
        for gate in self.cache_gates:
            for names in (gate.stream_in, gate.stream_out, gate.probe_values, gate.probe_base):
                names[:] = [new if n == old else n for n in names]

    def output_names(self) -> list[str]:
        out = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        return [a.name if isinstance(a, Node) else repr(a) for a in out.args[0]]

    # -- annotations -----------------------------------------------------------------------
    @staticmethod
    def info(node: Node) -> NodeInfo:
        raw = node.meta.get("custom", {}).get("dacc")
        return from_dict(NodeInfo, raw) if raw else NodeInfo()

    @staticmethod
    def set_info(node: Node, info: NodeInfo) -> None:
        # a fresh dict: export shares one "custom" dict between some nodes
        node.meta["custom"] = {**(node.meta.get("custom") or {}), "dacc": to_dict(info)}

    @staticmethod
    def module_stack(node: Node) -> list[tuple[str, str]]:
        """(path, class name) from outermost to innermost module that produced `node`."""
        stack = node.meta.get("nn_module_stack") or {}
        return [(path, cls.rsplit(".", 1)[-1]) for path, cls in stack.values()
                if path and not path.startswith("_empty")]

    @staticmethod
    def block_of(node: Node) -> tuple[str, int, str] | None:
        """(list path, index, block class) of the outermost indexed module around `node`."""
        for path, cls in ProgramIR.module_stack(node):
            m = _BLOCK_RE.match(path)
            if m:
                return m["list"], int(m["index"]), cls
        return None

    # -- shapes ----------------------------------------------------------------------------
    def _canonical_symbols(self) -> dict[sympy.Symbol, str]:
        names: dict[sympy.Symbol, str] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder" and node.name in self.user_inputs:
                val = node.meta.get("val")
                for dim in getattr(val, "shape", ()):
                    expr = _expr(dim)
                    for sym in sorted(expr.free_symbols, key=str):
                        names.setdefault(sym, f"s{len(names)}")
        return names

    def expr(self, value: Any) -> sympy.Expr:
        e = _expr(value)
        return e.xreplace({s: sympy.Symbol(n, integer=True, positive=True) for s, n in self.symbols.items()})

    def shape(self, node_or_val: Any) -> list[sympy.Expr] | None:
        val = node_or_val.meta.get("val") if isinstance(node_or_val, Node) else node_or_val
        if not isinstance(val, torch.Tensor):
            return None
        return [self.expr(d) for d in val.shape]

    def type_text(self, node: Node) -> str:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return f"{dtype_text(val.dtype)}[{', '.join(str(d) for d in self.shape(val))}]"
        if isinstance(val, (list, tuple)):
            return "(" + ", ".join(f"{dtype_text(v.dtype)}[{', '.join(str(d) for d in self.shape(v))}]"
                                   if isinstance(v, torch.Tensor) else str(self.expr(v)) if _is_sym(v) else repr(v)
                                   for v in val) + ")"
        if _is_sym(val):
            return f"sym {self.expr(val)}"
        return repr(val) if val is not None else ""

    def shape_env(self):
        return next((n.meta["val"].fake_mode.shape_env for n in self.graph.nodes
                     if n.op == "placeholder" and hasattr(n.meta.get("val"), "fake_mode")), None)

    def upper_bound(self, expr: sympy.Expr) -> sympy.Expr:
        """`expr` with every data-dependent size (an unbacked symbol such as the row count of
        `torch.nonzero`) replaced by the largest value torch.export allows it. Input shapes do not
        determine such sizes, so what is computed from them (FLOPs) can only be an upper bound;
        where torch knows no real bound (it often keeps int64's), the term is left out instead."""
        canonical = set(self.symbols.values())
        free = [s for s in expr.free_symbols if s.name not in canonical]
        if not free:
            return expr
        env = self.shape_env()
        ranges = {str(k): v for k, v in (env.var_to_range.items() if env is not None else ())}
        bounds = {}
        for sym in free:
            vr = ranges.get(sym.name)
            hi = vr.upper if vr is not None else None
            known = isinstance(hi, (int, sympy.Integer)) and int(hi) < 2 ** 31
            bounds[sym] = sympy.Integer(int(hi) if known else 0)
        return expr.xreplace(bounds)

    def guards(self) -> list[sympy.Basic]:
        """Shape conditions torch.export assumed while tracing, over canonical symbols.

        torch.export keeps only ranges when a program is saved; a condition such as
        `hidden_states.size(2) // 2 == 4` is lost, so dacc records them and checks them itself."""
        shape_env = self.shape_env()
        if shape_env is None:
            return []
        out, seen = [], set()
        for guard in shape_env.guards:
            e = self.expr(shape_env.simplify(guard.expr))
            if e is sympy.true or str(e) in seen:
                continue
            if not {str(s) for s in e.free_symbols} <= set(self.symbols.values()):
                continue  # about a specialized or internal size, checked through the input shapes
            seen.add(str(e))
            out.append(e)
        return out

    def symbol_specs(self) -> list[SymbolSpec]:
        specs, seen = [], set()
        by_name = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        ranges = {_expr(k): v for k, v in self.ep.range_constraints.items()}
        for spec in self.traced.inputs:
            node = by_name.get(_placeholder_name(self, spec))
            val = node.meta.get("val") if node is not None else None
            for dim, size in enumerate(getattr(val, "shape", ())):
                e = _expr(size)
                if isinstance(e, sympy.Symbol) and e not in seen and e in self.symbols:
                    seen.add(e)
                    vr = ranges.get(e)
                    lo = int(vr.lower) if vr is not None else 0
                    hi = vr.upper if vr is not None else None
                    hi = int(hi) if isinstance(hi, (int, sympy.Integer)) else None  # int_oo: unbounded
                    specs.append(SymbolSpec(self.symbols[e], spec.path, dim, lo, hi))
        return specs


def _placeholder_name(ir: ProgramIR, spec: InputSpec) -> str | None:
    idx = [s.path for s in ir.traced.inputs].index(spec.path)
    return ir.user_inputs[idx] if idx < len(ir.user_inputs) else None


def _is_sym(v: Any) -> bool:
    return isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _expr(v: Any) -> sympy.Expr:
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return v.node.expr
    if isinstance(v, sympy.Basic):
        return v
    return sympy.Integer(int(v))
