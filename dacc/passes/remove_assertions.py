"""Remove the dtype/device assertions torch.export inserts after `.to()` calls.

They cost a Python call each on every step, and they pin the device the model was traced on,
which would stop `artifact.to("cuda")`. The runtime checks input dtypes once at the boundary.
"""
from __future__ import annotations

import torch

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.schema.plan import Plan

_ASSERTIONS = (torch.ops.aten._assert_tensor_metadata.default,)


def remove_assertions(ir: ProgramIR, plan: Plan) -> PassResult:
    dead = [n for n in ir.graph.nodes if n.op == "call_function" and n.target in _ASSERTIONS and not n.users]
    for node in dead:
        ir.graph.erase_node(node)
    return PassResult(bool(dead), [f"removed {len(dead)} tensor-metadata assertions"])
