"""DBCache (Fn=1, Bn=0 is First Block Cache): always run the first Fn and last Bn blocks; between
them a gate compares the residual of the first Fn blocks with the one of the last computed step
(relative L1) and, below the threshold, skips the middle blocks and adds their cached residual."""
from __future__ import annotations

from dacc.compiler.cache_knobs import dynamic_knobs
from dacc.compiler.cache_ranges import block_positions, new_gate, streams_through
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
    first, last = blocks[opts.Fn], blocks[len(blocks) - opts.Bn - 1]
    # the probe: residual of the front blocks, i.e. streams entering `first` minus streams entering block 0
    front_in, front_out = streams_through(specs, blocks[0], blocks[opts.Fn - 1], ir.output_names(),
                                          leaving=specs[blocks[opts.Fn - 1]].stream_outputs)
    knobs = dynamic_knobs("dbcache", plan.cache.cache_ratio, opts, plan.num_inference_steps)
    ir.cache_gate = new_gate(ir, plan, "dbcache", first, last, probe="residual", probe_values=front_out,
                             probe_base=front_in, threshold=knobs["threshold"], taylor_order=opts.taylorseer_order)
    return PassResult(True, [f"gate over {specs[first].name}..{specs[last].name}, "
                             f"threshold {knobs['threshold']:.3g}, probe after {specs[blocks[opts.Fn - 1]].name}"])
