"""Rewrite the selected `aten.linear` calls into dacc's quantized linear operators.

Each selected weight parameter leaves the exported program: its placeholder and signature entry
are replaced by two buffers, the int8 weight (`<fqn>.int8`) and its per-channel fp32 scale
(`<fqn>.scale`), which the artifact stores in safetensors like every other weight. A weight read
by anything but linears is left alone. The node keeps its annotation (role, segment), gains the
mode, and each linear's bytes before and after and its weight error are recorded for the
manifest and `dacc inspect`.

Selection: every linear, minus `quantize.exclude` (glob patterns on the module path, e.g.
`transformer_blocks.0.*`) and, unless `keep_fragile: false`, the layers known to be fragile:
embedders, the final projection and adaptive-norm modulation, whose errors every token or every
block inherits.
"""
from __future__ import annotations

import difflib
import fnmatch

import torch
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.kernels.int8 import dequantize_weight_int8, quantize_weight_int8
from dacc.kernels.ops import QUANTIZED_LINEARS
from dacc.schema.plan import Plan

FRAGILE = ("*embed*", "proj_out", "norm_out.*", "*norm*.linear", "*norm*.linear_1", "*norm*.linear_2")


def _module_path(fqn: str) -> str:
    return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn


def select(paths: list[str], plan: Plan) -> tuple[set[str], list[str]]:
    """(module paths to quantize, warnings for exclude patterns that match nothing)."""
    patterns = list(plan.quantize.exclude)
    warnings = []
    for pat in patterns:
        if not fnmatch.filter(paths, pat):
            near = difflib.get_close_matches(pat, paths, n=3, cutoff=0.3)
            warnings.append(f"warning: quantize.exclude pattern {pat!r} matches no linear"
                            + (f"; nearest paths: {', '.join(near)}" if near else ""))
    if plan.quantize.keep_fragile:
        patterns += FRAGILE
    return {p for p in paths if not any(fnmatch.fnmatchcase(p, pat) for pat in patterns)}, warnings


def quantize_linears(ir: ProgramIR, plan: Plan) -> PassResult:
    mode = plan.quantize.mode
    if mode == "none":
        return PassResult(False, ["quantize.mode none"])
    linears = [n for n in ir.compute_nodes() if ir.info(n).role == "linear" and ir.is_param(n.args[1])]
    by_weight: dict[Node, list[Node]] = {}
    for node in linears:
        by_weight.setdefault(node.args[1], []).append(node)
    paths = sorted({_module_path(ir.param_of[w.name]) for w in by_weight})
    chosen, notes = select(paths, plan)
    before = after = done = 0
    for weight, users in by_weight.items():
        fqn = ir.param_of[weight.name]
        if _module_path(fqn) not in chosen or len(weight.users) != len(users):
            continue
        real = ir.param_tensor(weight).detach()
        q, scale = quantize_weight_int8(real)
        error = float((dequantize_weight_int8(q, scale, torch.float32) - real.float()).norm()
                      / real.float().norm().clamp_min(1e-12))
        qnode, snode = _replace_weight(ir, weight, fqn, q, scale)
        for node in users:
            _rewrite(ir, node, mode, qnode, snode, real, q, scale, error)
        before += real.numel() * real.element_size()
        after += q.numel() + scale.numel() * 4
        done += 1
    notes.insert(0, f"{mode}: {done} of {len(by_weight)} linear weights quantized, "
                    f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
    return PassResult(done > 0, notes)


def _replace_weight(ir: ProgramIR, weight: Node, fqn: str, q: torch.Tensor, scale: torch.Tensor) -> tuple[Node, Node]:
    """Swap the weight's placeholder and signature entry for two persistent buffers."""
    ep, graph = ir.ep, ir.graph
    fake_mode = weight.meta["val"].fake_mode
    specs = ep.graph_signature.input_specs
    index = next(i for i, s in enumerate(specs) if s.arg.name == weight.name)
    new_nodes = []
    for suffix, tensor in (("int8", q), ("scale", scale)):
        target = f"{fqn}.{suffix}"
        with graph.inserting_before(weight):
            node = graph.placeholder(f"{weight.name}_{suffix}")
        node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
        specs.insert(index + len(new_nodes), InputSpec(InputKind.BUFFER, TensorArgument(node.name), target, True))
        ep.state_dict[target] = tensor
        ir.param_of[node.name] = target
        new_nodes.append(node)
    return new_nodes[0], new_nodes[1]


def _rewrite(ir: ProgramIR, node: Node, mode: str, qnode: Node, snode: Node, real: torch.Tensor, q: torch.Tensor,
             scale: torch.Tensor, error: float) -> None:
    op, weight = QUANTIZED_LINEARS[mode], node.args[1]
    x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    with ir.graph.inserting_after(node):
        new = ir.graph.call_function(op, (x, qnode, snode, bias))
    new.meta = dict(node.meta)
    with weight.meta["val"].fake_mode:
        new.meta["val"] = op(x.meta["val"], qnode.meta["val"], snode.meta["val"],
                             bias.meta["val"] if isinstance(bias, Node) else None)
    info = ir.info(node)
    info.detail = {**info.detail, "quant": mode,
                   "bytes_before": real.numel() * real.element_size(), "bytes_after": q.numel() + scale.numel() * 4,
                   "weight_error": round(error, 6)}
    ir.set_info(new, info)
    node.replace_all_uses_with(new)
    for spec in ir.ep.graph_signature.output_specs:  # the final projection may be the graph's output
        if getattr(spec.arg, "name", None) == node.name:
            spec.arg = TensorArgument(new.name)
    ir.graph.erase_node(node)
    if not weight.users:  # the float weight leaves the program and the artifact
        specs = ir.ep.graph_signature.input_specs
        specs.pop(next(i for i, s in enumerate(specs) if s.arg.name == weight.name))
        ir.ep.state_dict.pop(ir.param_of.pop(weight.name), None)
        ir.graph.erase_node(weight)
