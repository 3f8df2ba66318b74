"""SCM (step computation masking): a per-step compute/skip mask fixed at compile time. Alone it
gates all blocks; with another strategy, masked steps skip and the others run that strategy's gate.

`strategy: schedule` and `strategy: magcache` are the same gate with its mask left to calibration:
the compiler measures on sample() what skipping each step costs (dacc/compiler/schedule.py) or the
residual magnitude curve (dacc/compiler/magcache.py) and fills the mask in; until then every step
computes."""
from __future__ import annotations

from dacc.compiler.cache_knobs import CALIBRATED_MASKS, dynamic_knobs
from dacc.compiler.cache_ranges import block_positions, new_gate
from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_specs
from dacc.schema.plan import Plan, cache_options


def apply_step_mask(ir: ProgramIR, plan: Plan) -> PassResult:
    strategy = plan.cache.strategy
    if strategy == "none":
        return PassResult(False)
    opts = cache_options(plan)
    mask = dynamic_knobs(strategy, plan.cache.cache_ratio, opts, plan.num_inference_steps)["mask"]
    if strategy in ("scm", *CALIBRATED_MASKS):
        blocks = block_positions(segment_specs(ir))
        ir.cache_gate = new_gate(ir, plan, strategy, blocks[0], blocks[-1], taylor_order=opts.taylorseer_order)
        if strategy in CALIBRATED_MASKS:
            return PassResult(True, ["step mask: chosen by calibration on sample()"])
    if not mask:
        return PassResult(False)
    ir.cache_gate.mask = mask
    return PassResult(True, [f"step mask: {sum(mask)}/{len(mask)} steps compute"])
