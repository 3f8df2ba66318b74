"""Well-formedness checks that run after every pass (a failure is a compiler bug, named by pass)."""
from __future__ import annotations

import operator

from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.segments import segment_kind, segment_of


class InvariantError(AssertionError):
    pass


def check_invariants(ir: ProgramIR, after: str) -> None:
    def fail(msg: str) -> None:
        raise InvariantError(f"invariant broken after pass '{after}': {msg}")

    names = {n.name for n in ir.graph.nodes}
    for name in ir.user_inputs:
        if name not in names:
            fail(f"user input '{name}' disappeared")
    if sum(1 for n in ir.graph.nodes if n.op == "output") != 1:
        fail("graph must have exactly one output")
    end = -1
    for gate in ir.cache_gates:  # the runtime looks these values up by name, and runs the ranges in order
        missing = sorted((gate.reads() | set(gate.stream_out)) - names)
        if missing:
            fail(f"the cache gate reads values no longer in the graph: {', '.join(missing)}")
        if gate.skip_first <= end or gate.skip_last < gate.skip_first:
            fail(f"cache gate ranges overlap or are out of order: {gate.skip_first}..{gate.skip_last} after {end}")
        end = gate.skip_last
    compute = ir.compute_nodes()
    for node in compute:
        try:
            ir.info(node)
        except ValueError as exc:
            fail(f"node {node.name} has a malformed dacc annotation: {exc}")

    segments = [segment_of(ir, n) for n in compute]
    if not any(segments):
        return  # not segmented yet
    if None in segments:
        fail(f"node {compute[segments.index(None)].name} has no segment")
    seen: list[str] = []
    for seg in segments:
        if not seen or seen[-1] != seg:
            if seg in seen:
                fail(f"segment '{seg}' is not contiguous")
            seen.append(seg)
    for node in compute:
        if node.target is operator.getitem and isinstance(node.args[0], Node) \
                and segment_of(ir, node) != segment_of(ir, node.args[0]):
            fail(f"{node.name} reads an item of {node.args[0].name} from another segment")
    # No segment reads a value from a later one, and segments depend on each other without cycles:
    # both follow from contiguity, because an fx graph lists every node after its inputs (lint
    # checks it after each pass) and segments run in the order of their first node.
    for seg in seen:
        if segment_kind(seg) == "block":
            if not any(segment_of(ir, n) == seg and ir.info(n).role == "attention" for n in compute):
                fail(f"block segment '{seg}' has no attention call")
