"""DBCache (Fn=1, Bn=0 is First Block Cache): always run the first Fn and last Bn blocks; between
them a gate compares the residual of the first Fn blocks with the one of the last computed step
(relative L1) and, below the threshold, skips the middle blocks and adds their cached residual."""
from __future__ import annotations

from dacc.compiler.cache_knobs import dynamic_knobs
from dacc.compiler.cache_ranges import block_positions, new_gate, range_streams
from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_specs
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan, cache_options


def insert_dbcache_gate(ir: ProgramIR, plan: Plan) -> PassResult:
    if plan.cache.strategy != "dbcache":
        return PassResult(False)
    opts = cache_options(plan)
    specs = segment_specs(ir)
    blocks = block_positions(specs)
    if opts.Fn + opts.Bn >= len(blocks):
        raise DaccError(f"dbcache Fn={opts.Fn} + Bn={opts.Bn} leaves no block to cache: the model has "
                        f"{len(blocks)} blocks", "plan cache.options", f"keep Fn + Bn below {len(blocks)}")
    first, last = specs[blocks[opts.Fn]].name, specs[blocks[len(blocks) - opts.Bn - 1]].name
    front_last = specs[blocks[opts.Fn - 1]]
    # the probe: residual of the front blocks, i.e. streams leaving block Fn-1 minus their bases
    # before block 0 (this may insert a cache_base segment, so positions are looked up by name after)
    front_in, front_out = range_streams(ir, blocks[0], blocks[opts.Fn - 1], "dbcache",
                                        leaving=front_last.stream_outputs)
    names = [s.name for s in segment_specs(ir)]
    knobs = dynamic_knobs("dbcache", plan.cache.cache_ratio, opts, plan.num_inference_steps)
    ir.cache_gates = [new_gate(ir, plan, "dbcache", names.index(first), names.index(last), probe="residual",
                             probe_values=front_out, probe_base=front_in, threshold=knobs["threshold"],
                             taylor_order=opts.taylorseer_order)]
    return PassResult(True, [f"gate over {first}..{last}, threshold {knobs['threshold']:.3g}, "
                             f"probe after {front_last.name}"])
