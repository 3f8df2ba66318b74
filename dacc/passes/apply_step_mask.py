"""SCM (step computation masking): a per-step compute/skip mask fixed at compile time. Alone it
gates all blocks; with another strategy, masked steps skip and the others run that strategy's gate.
`strategy: schedule` with `ranges: k` splits the blocks into k contiguous ranges, one gate each, so
calibration can give each range its own step mask.

`strategy: schedule` and `strategy: magcache` are the same gate with its mask left to calibration:
the compiler measures on sample() what skipping each step costs (dacc/compiler/schedule.py) or the
residual magnitude curve (dacc/compiler/magcache.py) and fills the mask in; until then every step
computes."""
from __future__ import annotations

from dacc.compiler.cache_knobs import CALIBRATED_MASKS, dynamic_knobs, fixed_mask
from dacc.compiler.cache_ranges import block_range_gates
from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.schema.plan import Plan, cache_options


def apply_step_mask(ir: ProgramIR, plan: Plan) -> PassResult:
    strategy = plan.cache.strategy
    if strategy == "none":
        return PassResult(False)
    opts = cache_options(plan)
    mask = dynamic_knobs(strategy, plan.cache.cache_ratio, opts, plan.num_inference_steps)["mask"]
    if strategy in ("scm", *CALIBRATED_MASKS):
        ranges = getattr(opts, "ranges", 1)
        ir.cache_gates = block_range_gates(ir, plan, strategy, ranges, taylor_order=opts.taylorseer_order)
        fixed = getattr(opts, "masks", None)
        if fixed is not None:  # a schedule given in full (what `dacc calibrate` prints): nothing to calibrate
            for gate, given in zip(ir.cache_gates, fixed):
                gate.mask = fixed_mask(given, plan.num_inference_steps)
            return PassResult(True, [f"step masks fixed by the plan: {', '.join(str(sum(g.mask)) for g in ir.cache_gates)}"
                                     f"/{plan.num_inference_steps} steps compute"])
        if strategy in CALIBRATED_MASKS:
            each = f" for each of {ranges} block ranges" if ranges > 1 else ""
            return PassResult(True, [f"step mask{each}: chosen by calibration on sample()"])
    if not mask:
        return PassResult(False)
    for gate in ir.cache_gates:
        gate.mask = list(mask)
    return PassResult(True, [f"step mask: {sum(mask)}/{len(mask)} steps compute"])
