"""CFG parallelism (plan `parallel.cfg: 2`): a batched classifier-free-guidance call carries the
unconditional and the conditional half in one batch; rank 0 of the cfg group runs the first
half, rank 1 the second, and every rank returns the whole output.

Every input with the batch dim is sharded on entry (`dacc.shard` along it), every output with it
is gathered on exit (`dacc.gather`, one all-gather); everything between runs on half the batch,
shapes included. The batch dim is the first dim of the first tensor input, as in every diffusers
transformer; it must be dynamic, and each call's batch must be even (a shape condition of the
program, checked on every call).
"""
from __future__ import annotations

import sympy
import torch

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.sharding import SizeEmitter, check_examples, insert_op, redirect, repropagate
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan

GROUP = "cfg"


def split_cfg(ir: ProgramIR, plan: Plan) -> PassResult:
    world = plan.parallel.cfg
    if world == 1:
        return PassResult(False, ["parallel.cfg 1"])
    by_name = {n.name: n for n in ir.graph.nodes if n.op == "placeholder"}
    tensors = [by_name[name] for name in ir.user_inputs if isinstance(by_name[name].meta.get("val"), torch.Tensor)]
    batch = ir.shape(tensors[0])[0] if tensors and ir.shape(tensors[0]) else None
    if not isinstance(batch, sympy.Symbol):
        raise DaccError(f"parallel.cfg: the batch size ({batch}) of input {tensors[0].name if tensors else '?'} is "
                        "not dynamic, so the batch cannot be split between ranks", "split_cfg",
                        "keep dim 0 dynamic in dynamic_shapes(), or set parallel.cfg: 1")
    check_examples(ir, [batch], world, "parallel.cfg", "make every example's batch a CFG batch (unconditional and "
                   "conditional halves, so even) in example_inputs() and more_example_inputs()")
    nodes = list(ir.graph.nodes)
    first = next(n for n in nodes if n.op == "call_function")
    batch_size = SizeEmitter(ir, first, "prologue").emit(batch)
    sharded = 0
    for ph in tensors:
        dim = next((d for d, e in enumerate(ir.shape(ph)) if e == batch), None)
        if dim is None:
            continue
        shard = insert_op(ir, first, torch.ops.dacc.shard.default, (ph, dim, [batch_size], GROUP, world), "prologue")
        redirect(ir, ph, shard, keep=lambda u: u is batch_size)
        sharded += 1
    out = next(n for n in reversed(nodes) if n.op == "output")
    full = SizeEmitter(ir, out, "epilogue")
    gathered = 0
    for value in [a for a in out.args[0] if isinstance(a, torch.fx.Node)]:
        shape = ir.shape(value) or []
        dim = next((d for d, e in enumerate(shape) if e == batch), None)
        if dim is None:
            continue
        gather = insert_op(ir, out, torch.ops.dacc.gather.default, (value, dim, [full.emit(batch)], GROUP, world),
                           "epilogue")
        redirect(ir, value, gather, keep=lambda u: u is not out)
        gathered += 1
    ir.partition_guards.append(sympy.Eq(sympy.Mod(batch, world), 0))
    repropagate(ir, {batch}, world)
    return PassResult(True, [f"cfg {world}: {sharded} inputs split along the batch, {gathered} outputs gathered; "
                             f"the batch must be a multiple of {world}"])
