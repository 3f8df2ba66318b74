"""Shared by the cache-gate passes: which block range a gate covers, which residual streams cross
it, and the gate record itself.

A range can be skipped only if everything that leaves it is a residual stream: then the stream
entering the range plus a cached residual stands in for the range's work.
"""
from __future__ import annotations

from typing import Any

from dacc.compiler.ir import ProgramIR
from dacc.compiler.segments import segment_specs
from dacc.schema.errors import DaccError
from dacc.schema.manifest import CacheGate, SegmentSpec
from dacc.schema.plan import Plan, cache_options


def block_positions(specs: list[SegmentSpec]) -> list[int]:
    return [i for i, s in enumerate(specs) if s.kind == "block"]


def streams_through(specs: list[SegmentSpec], first: int, last: int, graph_outputs: list[str],
                    leaving: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(values entering, values leaving) segments first..last, paired stream by stream.

    `leaving` defaults to every value produced in the range and read after it."""
    producer = {v: i for i, s in enumerate(specs) for v in s.outputs}
    if leaving is None:
        read_after = {v for s in specs[last + 1:] for v in s.inputs} | set(graph_outputs)
        leaving = [v for s in specs[first:last + 1] for v in s.outputs if v in read_after]
    where = f"segments {specs[first].name}..{specs[last].name}"
    entering = []
    for value in leaving:
        current = value
        while True:
            seg = specs[producer[current]]
            if current not in seg.stream_outputs:
                raise DaccError(f"cannot cache {where}: value {current} of {seg.name} leaves it but is not a "
                                "residual stream", where, "choose other Fn/Bn, or report this model")
            entering_value = seg.stream_inputs[seg.stream_outputs.index(current)]
            if first <= producer.get(entering_value, -1) <= last:
                current = entering_value
                continue
            entering.append(entering_value)
            break
    return entering, leaving


def new_gate(ir: ProgramIR, plan: Plan, strategy: str, first: int, last: int, **fields: Any) -> CacheGate:
    specs = segment_specs(ir)
    stream_in, stream_out = streams_through(specs, first, last, ir.output_names())
    options = cache_options(plan)
    gate = CacheGate(strategy=strategy, skip_first=first, skip_last=last, stream_in=stream_in,
                     stream_out=stream_out, probe="none", probe_values=[], probe_base=[], threshold=0.0,
                     rescale=[], taylor_order=0, interval=1, mask=[], warmup=plan.cache.warmup,
                     cooldown=plan.cache.cooldown, max_cached_steps=getattr(options, "max_cached_steps", -1),
                     max_continuous_cached_steps=getattr(options, "max_continuous_cached_steps", -1))
    for key, value in fields.items():
        setattr(gate, key, value)
    mark_skippable(ir, specs, first, last)
    return gate


def mark_skippable(ir: ProgramIR, specs: list[SegmentSpec], first: int, last: int) -> None:
    names = {s.name for s in specs[first:last + 1]}
    for node in ir.compute_nodes():
        info = ir.info(node)
        if info.segment in names:
            info.gate = "skippable"
            ir.set_info(node, info)
