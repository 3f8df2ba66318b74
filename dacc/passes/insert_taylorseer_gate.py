"""TaylorSeer: run every block on every `interval`-th step; in between, forecast the blocks'
residual by a Taylor expansion from finite differences of the last computed steps."""
from __future__ import annotations

from dacc.compiler.cache_knobs import dynamic_knobs
from dacc.compiler.cache_ranges import block_positions, new_gate
from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_specs
from dacc.schema.plan import Plan, cache_options


def insert_taylorseer_gate(ir: ProgramIR, plan: Plan) -> PassResult:
    if plan.cache.strategy != "taylorseer":
        return PassResult(False)
    opts = cache_options(plan)
    blocks = block_positions(segment_specs(ir))
    knobs = dynamic_knobs("taylorseer", plan.cache.cache_ratio, opts, plan.num_inference_steps)
    ir.cache_gates = [new_gate(ir, plan, "taylorseer", blocks[0], blocks[-1], taylor_order=opts.order,
                             interval=knobs["interval"])]
    return PassResult(True, [f"forecast order {opts.order}, compute every {knobs['interval']} steps"])
