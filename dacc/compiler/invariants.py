"""Well-formedness checks that run after every pass (a failure is a compiler bug, named by pass)."""
from __future__ import annotations

from dacc.compiler.ir import ProgramIR
from dacc.compiler.segments import segment_of


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
    position = {s: i for i, s in enumerate(seen)}
    for node in compute:
        here = position[segment_of(ir, node)]
        for inp in node.all_input_nodes:
            src = segment_of(ir, inp)
            if src is not None and position[src] > here:
                fail(f"{node.name} in segment {seen[here]} reads {inp.name} from later segment {src}")
    for seg in seen:
        if seg not in ("prologue", "epilogue") and not seg.startswith("transition."):
            if not any(segment_of(ir, n) == seg and ir.info(n).role == "attention" for n in compute):
                fail(f"block segment '{seg}' has no attention call")
