"""Shared by the cache-gate passes: which block range a gate covers, which residual streams cross
it, and the gate record itself.

A range can be skipped only if everything that leaves it is a residual stream: then a value
known before the range plus a cached residual stands in for the range's work. That value, the
*base* of a leaving stream, is what the range would produce if every block in it were the
identity on its streams. Without transitions in the range it is simply the stream entering the
range. A transition inside the range may merge or reshape streams (Chroma concatenates text and
image between its double and single blocks, like the `torch.cat` in a Flux model that does it
outside the blocks): then the base is that transition applied to the entering streams, and its
nodes are copied into a `cache_base.<segment>` segment right before the range, which runs on
every step (a concatenation or a slice: cheap next to any block).
"""
from __future__ import annotations

from typing import Any

from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.segments import segment_specs
from dacc.schema.errors import DaccError
from dacc.schema.manifest import CacheGate, SegmentSpec
from dacc.schema.plan import Plan, cache_options

BASE_SEGMENT = "cache_base"

# what a user can change when a range cannot be cached, per strategy: the knobs it has
RANGE_FIX = {
    "dbcache": "choose Fn/Bn in cache.options so that {seg} falls outside the skipped range",
    "teacache": "teacache skips every block at once and has no knob that moves its range: use strategy "
                "dbcache with Fn/Bn that leave {seg} outside the skipped range",
    "taylorseer": "taylorseer forecasts every block at once and has no knob that moves its range: use strategy "
                  "dbcache with taylorseer_order for the forecast and Fn/Bn that leave {seg} outside the range",
    "scm": "scm masks every block at once and has no knob that moves its range: use strategy dbcache with "
           "scm_policy/scm_mask and Fn/Bn that leave {seg} outside the range",
    "schedule": "schedule masks every block at once and has no knob that moves its range: use strategy dbcache "
                "with scm_mask (copy the schedule's mask) and Fn/Bn that leave {seg} outside the range",
    "magcache": "magcache masks every block at once and has no knob that moves its range: use strategy dbcache "
                "with scm_mask (copy magcache's mask) and Fn/Bn that leave {seg} outside the range",
}


def range_fix(strategy: str, segment: str) -> str:
    return RANGE_FIX.get(strategy, RANGE_FIX["dbcache"]).format(seg=segment)


def block_positions(specs: list[SegmentSpec]) -> list[int]:
    return [i for i, s in enumerate(specs) if s.kind == "block"]


class _Bases:
    """Finds (and, for transitions, builds) the base of each value leaving segments first..last."""

    def __init__(self, ir: ProgramIR, specs: list[SegmentSpec], first: int, last: int, strategy: str):
        self.ir, self.specs, self.first, self.last, self.strategy = ir, specs, first, last, strategy
        self.producer = {v: i for i, s in enumerate(specs) for v in s.outputs}
        self.nodes = {n.name: n for n in ir.graph.nodes}
        self.memo: dict[str, Node] = {}
        self.where = f"segments {specs[first].name}..{specs[last].name}"
        self.segment = f"{BASE_SEGMENT}.{specs[first].name}"
        self.anchor = next(n for n in ir.compute_nodes() if ir.info(n).segment == specs[first].name)
        self.copied = 0

    def inside(self, name: str) -> bool:
        return self.first <= self.producer.get(name, -1) <= self.last

    def fail(self, value: str, seg: SegmentSpec) -> DaccError:
        return DaccError(f"{self.strategy} cannot cache {self.where}: value {value} of {seg.name} is read after "
                         "the range but is not a residual stream", self.where,
                         f"{range_fix(self.strategy, seg.name)}, or report this model")

    def base(self, name: str) -> Node:
        if name in self.memo:
            return self.memo[name]
        if not self.inside(name):
            return self.nodes[name]  # computed before the range: known on every step
        seg = self.specs[self.producer[name]]
        if seg.kind == "block":
            if name not in seg.stream_outputs:
                raise self.fail(name, seg)
            out = self.base(seg.stream_inputs[seg.stream_outputs.index(name)])
        else:
            out = self._copy_transition(self.nodes[name], seg)
        self.memo[name] = out
        return out

    def _copy_transition(self, value: Node, seg: SegmentSpec) -> Node:
        """Copy `value`'s computation inside transition `seg`, reading bases instead of block outputs."""
        members = {n for n in self.ir.compute_nodes() if self.ir.info(n).segment == seg.name}
        closure, stack = [], [value]
        while stack:
            n = stack.pop()
            if n in members and n not in closure:
                closure.append(n)
                stack.extend(n.all_input_nodes)
        copies: dict[Node, Node] = {}
        for n in [m for m in self.ir.graph.nodes if m in closure]:  # graph order
            with self.ir.graph.inserting_before(self.anchor):
                copy = self.ir.graph.node_copy(n, lambda a: copies[a] if a in copies else self.base(a.name)
                                               if a.op == "call_function" else a)
            info = self.ir.info(copy)
            info.segment, info.gate = self.segment, None
            self.ir.set_info(copy, info)
            copies[n] = copy
            self.copied += 1
        return copies[value]


def range_streams(ir: ProgramIR, first: int, last: int, strategy: str,
                  leaving: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(bases, values leaving) segments first..last, paired stream by stream; inserts a
    `cache_base` segment before the range when a transition inside it has to be replayed.
    Segment indices after the range's start shift by one when that happens.

    `leaving` defaults to every value produced in the range and read after it."""
    specs = segment_specs(ir)
    if leaving is None:
        read_after = {v for s in specs[last + 1:] for v in s.inputs} | set(ir.output_names())
        leaving = [v for s in specs[first:last + 1] for v in s.outputs if v in read_after]
    bases = _Bases(ir, specs, first, last, strategy)
    entering = []
    for value in leaving:
        base = bases.base(value)
        if ir.type_text(base) != ir.type_text(bases.nodes[value]):
            seg = specs[bases.producer[value]].name
            raise DaccError(f"{strategy} cannot cache {bases.where}: {value} ({ir.type_text(bases.nodes[value])}) "
                            f"has no value of its shape to add a residual to (nearest: {base.name}, "
                            f"{ir.type_text(base)})", bases.where, range_fix(strategy, seg))
        entering.append(base.name)
    return entering, leaving


def new_gate(ir: ProgramIR, plan: Plan, strategy: str, first: int, last: int, **fields: Any) -> CacheGate:
    """The gate over segments first..last (indices before any `cache_base` insertion)."""
    names = [s.name for s in segment_specs(ir)]
    first_name, last_name = names[first], names[last]
    stream_in, stream_out = range_streams(ir, first, last, strategy)
    names = [s.name for s in segment_specs(ir)]
    first, last = names.index(first_name), names.index(last_name)
    options = cache_options(plan)
    gate = CacheGate(strategy=strategy, skip_first=first, skip_last=last, stream_in=stream_in,
                     stream_out=stream_out, probe="none", probe_values=[], probe_base=[], threshold=0.0,
                     rescale=[], taylor_order=0, interval=1, mask=[], warmup=plan.cache.warmup,
                     cooldown=plan.cache.cooldown, max_cached_steps=getattr(options, "max_cached_steps", -1),
                     max_continuous_cached_steps=getattr(options, "max_continuous_cached_steps", -1))
    for key, value in fields.items():
        setattr(gate, key, value)
    mark_skippable(ir, segment_specs(ir), first, last)
    return gate


def block_range_gates(ir: ProgramIR, plan: Plan, strategy: str, ranges: int, **fields: Any) -> list[CacheGate]:
    """`ranges` gates over the blocks split into contiguous ranges of (nearly) equal block counts, in
    order; one gate over every block when `ranges` is 1."""
    specs = segment_specs(ir)
    blocks = block_positions(specs)
    if ranges > len(blocks):
        raise DaccError(f"{strategy} cannot split {len(blocks)} blocks into {ranges} ranges", "plan cache.options.ranges",
                        f"set ranges to at most {len(blocks)}")
    bounds = [round(k * len(blocks) / ranges) for k in range(ranges + 1)]
    # by name: a gate's `cache_base` segment shifts the positions of everything after its start
    spans = [(specs[blocks[lo]].name, specs[blocks[hi - 1]].name) for lo, hi in zip(bounds, bounds[1:])]
    gates = []
    for first, last in spans:
        names = [s.name for s in segment_specs(ir)]
        gates.append(new_gate(ir, plan, strategy, names.index(first), names.index(last), **fields))
    return gates


def mark_skippable(ir: ProgramIR, specs: list[SegmentSpec], first: int, last: int) -> None:
    names = {s.name for s in specs[first:last + 1]}
    for node in ir.compute_nodes():
        info = ir.info(node)
        if info.segment in names:
            info.gate = "skippable"
            ir.set_info(node, info)
