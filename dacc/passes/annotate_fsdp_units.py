"""FSDP2 units (plan `parallel.fsdp: P`): which parameters are sharded together, and when they
are gathered. The graph is unchanged: every rank runs the whole program on its own inputs (the
fsdp dim is data parallel), and the runtime gathers a unit's weights (torch's `fully_shard`,
`unshard()`) just before the first segment that reads them and frees them after the last.

A unit is the set of module paths owning the weights a segment reads first: each block is one
unit, the prologue's embedders another, the epilogue's projection a third. A module whose
weights are first read by two segments makes those two one unit (FSDP2 shards whole modules).
Weights are the parameters and persistent buffers of the program (a quantized linear's int8
weight and scales are buffers); tensor constants and 0-d tensors stay whole on every rank.
"""
from __future__ import annotations

from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.compiler.segments import segment_members, segment_of
from dacc.schema.dtypes import dtype_text
from dacc.schema.manifest import FsdpParam, FsdpUnit, fsdp_shard
from dacc.schema.plan import Plan


def annotate_fsdp_units(ir: ProgramIR, plan: Plan) -> PassResult:
    world = plan.parallel.fsdp
    if world == 1:
        return PassResult(False, ["parallel.fsdp 1"])
    order = {seg: i for i, seg in enumerate(segment_members(ir))}
    first_reader: dict[str, str] = {}  # weight fqn -> the first segment reading it
    readers: dict[str, set[str]] = {}
    for node in ir.graph.nodes:
        fqn = _sharded_weight(ir, node)
        if fqn is None:
            continue
        segs = sorted({segment_of(ir, u) for u in node.users} - {None}, key=order.__getitem__)
        if segs:
            first_reader[fqn] = segs[0]
            readers[fqn] = set(segs)
    # union-find over segments: one owner module's weights must land in one unit
    parent = {s: s for s in set(first_reader.values())}

    def root(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    owner_segment: dict[str, str] = {}
    for fqn, seg in first_reader.items():
        owner = _owner(fqn)
        if owner in owner_segment:
            a, b = root(owner_segment[owner]), root(seg)
            if a != b:
                parent[max(a, b, key=order.__getitem__)] = min(a, b, key=order.__getitem__)
        else:
            owner_segment[owner] = seg
    groups: dict[str, list[str]] = {}
    for fqn in first_reader:
        groups.setdefault(root(first_reader[fqn]), []).append(fqn)
    units = []
    for lead in sorted(groups, key=order.__getitem__):
        fqns = sorted(groups[lead])
        segs = sorted(set().union(*(readers[f] for f in fqns)), key=order.__getitem__)
        params = [FsdpParam(f, list(_tensor(ir, f).shape), dtype_text(_tensor(ir, f).dtype)) for f in fqns]
        # rank 0 holds the largest chunk (the layout the artifact writes and FSDP2 pads to)
        units.append(FsdpUnit(name=lead, modules=sorted({_owner(f) for f in fqns}), params=params, segments=segs,
                              shard_bytes=sum(_nbytes(fsdp_shard(_tensor(ir, f), 0, world)) for f in fqns)))
    ir.fsdp_units, ir.fsdp_degree = units, world
    total = sum(_nbytes(_tensor(ir, f)) for f in first_reader)
    per_rank = sum(u.shard_bytes for u in units)
    return PassResult(True, [f"fsdp {world}: {len(units)} units, {total / 2**20:.2f} MiB of weights, "
                             f"{per_rank / 2**20:.2f} MiB stored per rank"])


def _sharded_weight(ir: ProgramIR, node: Node) -> str | None:
    if not ir.is_param(node):
        return None
    fqn = ir.param_of[node.name]
    t = ir.ep.state_dict.get(fqn)  # parameters and persistent buffers; constants stay whole
    return fqn if t is not None and t.dim() >= 1 else None


def _tensor(ir: ProgramIR, fqn: str):
    return ir.ep.state_dict[fqn]


def _owner(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _nbytes(t) -> int:
    return t.numel() * t.element_size()

