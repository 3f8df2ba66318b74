"""Split the graph into executable segments: prologue, one segment per transformer block,
transitions between blocks, epilogue. The runtime then decides per step which segments run.

Blocks are recovered from the graph itself: the outermost indexed module (`<list>.<i>` in
`nn_module_stack`) around a node, kept only for lists whose members contain an attention call.
Ownerless nodes between two nodes of the same block belong to it; elsewhere they form the
prologue, a transition, or the epilogue by position.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.passes.annotate_structure import SDPA
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan


# Shape queries carry the module of whoever first asked for a size, but export hoists them to the
# top of the graph: they belong wherever their position puts them, not to that module.
_POSITIONAL = (torch.ops.aten.sym_size.int,)
_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _is_shape_arithmetic(node: Node) -> bool:
    """A scalar computed from sizes alone (`s0 + s1`, `s2 // 2`). The tracer records it where a
    block first needs it and later blocks reuse that node, which would make it an output of the
    first block read by every later one: a value a skipped block would fail to provide."""
    return (node.op == "call_function" and isinstance(node.meta.get("val"), _SYM)
            and all(isinstance(i.meta.get("val"), _SYM) for i in node.all_input_nodes))


def _hoist_shape_arithmetic(ir: ProgramIR) -> int:
    """Move shape arithmetic right after its latest input (a size query of an input lands it in
    the prologue), so it is context computed before any block. Returns how many nodes moved."""
    order = {n: i for i, n in enumerate(ir.graph.nodes)}
    moved = 0
    for node in list(ir.graph.nodes):
        if not _is_shape_arithmetic(node) or not node.all_input_nodes:
            continue
        anchor = max(node.all_input_nodes, key=order.__getitem__)
        if anchor.next is not node:
            anchor.append(node)
            moved += 1
            order = {n: i for i, n in enumerate(ir.graph.nodes)}
    return moved


def _block_labels(ir: ProgramIR) -> list[str | None]:
    nodes = ir.compute_nodes()
    owners = [None if n.target in _POSITIONAL or _is_shape_arithmetic(n) else ir.block_of(n) for n in nodes]
    with_attention = {o[0] for o, n in zip(owners, nodes) if o and n.target in SDPA}
    return [f"{o[0]}.{o[1]}" if o and o[0] in with_attention else None for o in owners]


def segment_blocks(ir: ProgramIR, plan: Plan) -> PassResult:
    hoisted = _hoist_shape_arithmetic(ir)
    nodes = ir.compute_nodes()
    labels = _block_labels(ir)
    if not any(labels):
        raise DaccError("no transformer blocks found: no indexed submodule (e.g. transformer_blocks.0) "
                        "contains an attention call", "segmentation",
                        "dacc needs a model whose blocks live in an nn.ModuleList and call "
                        "scaled_dot_product_attention")
    prev = [None] * len(nodes)
    nxt = [None] * len(nodes)
    last = None
    for i, lab in enumerate(labels):
        last = lab or last
        prev[i] = last
    last = None
    for i in range(len(nodes) - 1, -1, -1):
        last = labels[i] or last
        nxt[i] = last
    segments: list[str] = []
    gaps: dict[tuple, str] = {}
    for i, lab in enumerate(labels):
        if lab is None:
            if prev[i] is None:
                lab = "prologue"
            elif nxt[i] is None:
                lab = "epilogue"
            elif prev[i] == nxt[i]:
                lab = prev[i]
            else:
                lab = gaps.setdefault((prev[i], nxt[i]), f"transition.{len(gaps)}")
        segments.append(lab)
    seen, order = set(), []
    for lab in segments:
        if not order or order[-1] != lab:
            if lab in seen:
                raise DaccError(f"segment '{lab}' is not contiguous in the traced graph", "segmentation",
                                "the model interleaves the computation of two blocks; report this model")
            seen.add(lab)
            order.append(lab)
    for node, lab in zip(nodes, segments):
        info = ir.info(node)
        info.segment = lab
        ir.set_info(node, info)
    blocks = sum(1 for s in order if s not in ("prologue", "epilogue") and not s.startswith("transition."))
    notes = [f"{len(order)} segments ({blocks} blocks)"]
    if hoisted:
        notes.append(f"{hoisted} shape computations moved next to their inputs")
    return PassResult(True, notes)
