"""For TeaCache: move the computation of the first block's timestep-modulated input (its
adaptive-norm output) out of the block into a `cache_probe` segment that runs before it, so the
gate can look at it before deciding whether any block runs.

The probe is found in the graph: the first node of the first block that has the shape of a
stream entering the block and depends both on that stream and on a non-stream input (the
timestep embedding). Its ancestors inside the block move with it; nothing is computed twice.
"""
from __future__ import annotations

import operator

from torch.fx import Node

from dacc.compiler.cache_ranges import block_positions
from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_specs
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan

PROBE_SEGMENT = "cache_probe"


def _ancestors_in(node: Node, members: set[Node]) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n not in members:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def find_modulated_input(ir: ProgramIR, block: str, streams: list[str], inputs: list[str]) -> tuple[Node, set[Node]]:
    nodes = [n for n in ir.compute_nodes() if ir.info(n).segment == block]
    members = set(nodes)
    stream_shapes = {ir.type_text(n) for n in ir.graph.nodes if n.name in streams}
    context = set(inputs) - set(streams)
    for node in nodes:
        if ir.type_text(node) not in stream_shapes:
            continue
        closure = _ancestors_in(node, members)
        outside = {i.name for n in closure for i in n.all_input_nodes if i not in members
               and not ir.is_param(i) and not ir.is_attribute(i)}
        if outside & set(streams) and outside & context:
            return node, closure
    raise DaccError(f"no timestep-modulated input found in {block}", "teacache",
                    "teacache needs blocks that modulate their input with the timestep embedding; use dbcache")


def hoist_cache_probe(ir: ProgramIR, plan: Plan) -> PassResult:
    if plan.cache.strategy != "teacache":
        return PassResult(False)
    specs = segment_specs(ir)
    first = specs[block_positions(specs)[0]]
    probe, closure = find_modulated_input(ir, first.name, first.stream_inputs, first.inputs)
    # a multi-output op travels with all its getitems (the deserializer regroups them anyway)
    closure |= {u for n in closure for u in n.users if u.target is operator.getitem}
    block = [n for n in ir.compute_nodes() if ir.info(n).segment == first.name]
    anchor = next(n for n in block if n not in closure)  # probe nodes go before it, in their order
    moving = False
    for node in block:
        moving = moving or node is anchor
        if node not in closure:
            continue
        if moving:
            anchor.prepend(node)
        info = ir.info(node)
        info.segment = PROBE_SEGMENT
        info.gate = "probe" if node is probe else info.gate
        ir.set_info(node, info)
    return PassResult(True, [f"{len(closure)} nodes of {first.name} moved to {PROBE_SEGMENT}; probe {probe.name}"])
