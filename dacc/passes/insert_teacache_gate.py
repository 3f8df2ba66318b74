"""TeaCache: accumulate the rescaled relative change of the first block's modulated input from
step to step; while the sum stays under the threshold, skip every block and add the cached
residual of the whole stack; otherwise compute and reset. The rescaling polynomial comes from the
plan or from calibration on the model's sample() (done after the passes, see compiler/calibrate.py)."""
from __future__ import annotations

from dacc.compiler.cache_knobs import dynamic_knobs
from dacc.compiler.cache_ranges import block_positions, new_gate
from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_specs
from dacc.schema.plan import Plan, cache_options


def insert_teacache_gate(ir: ProgramIR, plan: Plan) -> PassResult:
    if plan.cache.strategy != "teacache":
        return PassResult(False)
    opts = cache_options(plan)
    probe = next(n.name for n in ir.compute_nodes() if ir.info(n).gate == "probe")
    blocks = block_positions(segment_specs(ir))
    knobs = dynamic_knobs("teacache", plan.cache.cache_ratio, opts, plan.num_inference_steps)
    ir.cache_gates = [new_gate(ir, plan, "teacache", blocks[0], blocks[-1], probe="input", probe_values=[probe],
                             threshold=knobs["threshold"], rescale=list(opts.rescale or []))]
    return PassResult(True, [f"probe {probe}, threshold {knobs['threshold']:.3g}, "
                             f"rescale {'from plan' if opts.rescale else 'to calibrate'}"])
