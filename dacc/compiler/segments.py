"""From a segmented graph to the manifest's segment table: boundary values, residual streams,
FLOPs and parameter bytes of each segment, plus the attention and linear sites.

A residual stream of a block is a tensor that enters the block, is used by no later segment,
and leaves the block with the same symbolic shape (hidden_states; Flux's blocks carry two).
Values read by several blocks (timestep embedding, rotary tables) are context, not streams; an
earlier block's output that a later block reads again (HunyuanDiT's long skips) is still the
stream into the block right after it.
"""
from __future__ import annotations

import sympy
import torch
from torch.fx import Node

from dacc.compiler.comm import node_messages, node_sent_bytes
from dacc.compiler.flops import node_flops
from dacc.compiler.ir import ProgramIR
from dacc.compiler.memory import example_symbols, traffic_bytes, transient_peak, value_bytes
from dacc.schema.expr import to_tree
from dacc.schema.manifest import AttentionSite, LinearSite, SegmentSpec, node_segment, unit_gather_bytes


def segment_of(ir: ProgramIR, node: Node) -> str | None:
    if node.op != "call_function":
        return None
    return node_segment(node.meta)


def segment_kind(name: str) -> str:
    if name in ("prologue", "epilogue"):
        return name
    if name == "cache_probe":
        return "probe"
    # cache_base.*: a transition replayed on a gated range's bases (see cache_ranges.py)
    return "transition" if name.startswith(("transition.", "cache_base.")) else "block"


def _shape_key(ir: ProgramIR, node: Node) -> str | None:
    val = node.meta.get("val")
    return ir.type_text(node) if isinstance(val, torch.Tensor) else None


def segment_members(ir: ProgramIR) -> dict[str, list[Node]]:
    """Each segment's compute nodes, segments in graph order."""
    members: dict[str, list[Node]] = {}
    for node in ir.compute_nodes():
        members.setdefault(segment_of(ir, node), []).append(node)
    return members


def segment_specs(ir: ProgramIR) -> list[SegmentSpec]:
    members = segment_members(ir)
    order = list(members)
    position = {s: i for i, s in enumerate(order)}
    used_by: dict[str, set[int]] = {}
    for node in ir.graph.nodes:
        pos = position.get(segment_of(ir, node), len(order)) if node.op != "output" else len(order)
        for inp in node.all_input_nodes:
            used_by.setdefault(inp.name, set()).add(pos)

    block_output = {n.name: segment_kind(seg) == "block" for seg in order for n in members[seg]}

    gate_reads = set().union(*(g.reads() for g in ir.cache_gates))
    specs, block_index = [], 0
    fsdp_gathers = unit_gather_bytes(ir.fsdp_units or [], ir.fsdp_degree)
    example = example_symbols(ir)
    for seg in order:
        nodes = members[seg]
        inside = {n.name for n in nodes}
        inputs: list[Node] = []
        for n in nodes:
            for inp in n.all_input_nodes:
                if inp.name not in inside and not ir.is_param(inp) and not ir.is_attribute(inp) and inp not in inputs:
                    inputs.append(inp)
        outputs = [n for n in nodes if any(u.name not in inside for u in n.users) or n.name in gate_reads]
        params = {inp for n in nodes for inp in n.all_input_nodes if ir.is_param(inp)}
        param_bytes = sum(t.numel() * t.element_size() for t in map(ir.param_tensor, params) if t is not None)
        per_node = [node_flops(ir, n) for n in nodes]
        flops = sympy.expand(ir.upper_bound(sum(per_node, sympy.Integer(0))))
        traffic = sympy.expand(sum((traffic_bytes(ir, n) for n, f in zip(nodes, per_node) if f == 0), sympy.Integer(0)))
        sent = sympy.expand(sum((node_sent_bytes(ir, n) for n in nodes), sympy.Integer(0)) + fsdp_gathers.get(seg, 0))
        kind = segment_kind(seg)
        held = sympy.expand(sum((value_bytes(ir, o) for o in outputs), sympy.Integer(0)))
        transient = transient_peak(ir, nodes, example)
        s_in, s_out = [], []
        if kind == "block":
            here = position[seg]
            # a value no later segment reads; failing that, an earlier block's output that a later
            # block reads again (a U-ViT long skip): still the stream into this block, not context
            last_use = {i.name: max(used_by.get(i.name, {here})) for i in inputs}
            candidates = ([i for i in inputs if _shape_key(ir, i) and last_use[i.name] == here]
                          + [i for i in inputs if _shape_key(ir, i) and last_use[i.name] > here
                             and block_output.get(i.name, False)])
            for out in outputs:
                key = _shape_key(ir, out)
                match = next((c for c in candidates if _shape_key(ir, c) == key and c.name not in s_in), None)
                if key and match is not None:
                    s_in.append(match.name)
                    s_out.append(out.name)
        list_name = seg.rsplit(".", 1)[0] if kind == "block" else None
        specs.append(SegmentSpec(
            name=seg, kind=kind, block_list=list_name,
            block_index=block_index if kind == "block" else None,
            inputs=[i.name for i in inputs], outputs=[o.name for o in outputs],
            stream_inputs=s_in, stream_outputs=s_out, num_nodes=len(nodes),
            flops=str(flops), flops_tree=to_tree(flops), param_bytes=int(param_bytes),
            lowered=ir.lowering.calls.get(seg) if ir.lowering is not None else None,
            sent_bytes=str(sent), sent_bytes_tree=to_tree(sent), messages=sum(map(node_messages, nodes)),
            value_bytes=str(held), value_bytes_tree=to_tree(held),
            transient_bytes=str(transient), transient_bytes_tree=to_tree(transient),
            traffic_bytes=str(traffic), traffic_bytes_tree=to_tree(traffic)))
        block_index += kind == "block"
    return specs


def sites(ir: ProgramIR) -> tuple[list[AttentionSite], list[LinearSite]]:
    attention, linears = [], []
    for node in ir.compute_nodes():
        info = ir.info(node)
        d = info.detail
        if info.role == "attention":
            attention.append(AttentionSite(node.name, info.segment or "", d["heads"], d["head_dim"],
                                           d["q_len"], d["kv_len"], d["cross"]))
        elif info.role == "linear":
            linears.append(LinearSite(node.name, info.segment or "", d["weight"], d["in"], d["out"], d["bias"],
                                      d.get("quant", "none"), d.get("bytes_before", 0), d.get("bytes_after", 0),
                                      d.get("weight_error", 0.0), d.get("smoothing", 0.0)))
    return attention, linears
