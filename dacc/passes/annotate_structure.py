"""Annotate every attention call and every linear with what later passes need to rewrite them:
heads, head dim, query/key lengths (self vs cross attention), weight name and features."""
from __future__ import annotations

import torch

from dacc.compiler.ir import ProgramIR
from dacc.compiler.passes import PassResult
from dacc.schema.plan import Plan

aten = torch.ops.aten
SDPA = (aten.scaled_dot_product_attention.default,)
LINEAR = (aten.linear.default,)


def annotate_structure(ir: ProgramIR, plan: Plan) -> PassResult:
    n_attn = n_lin = 0
    for node in ir.compute_nodes():
        info = ir.info(node)
        if node.target in SDPA:
            q, k = ir.shape(node.args[0]), ir.shape(node.args[1])
            info.role = "attention"
            info.detail = {"heads": int(q[1]), "head_dim": int(q[3]), "q_len": str(q[2]),
                           "kv_len": str(k[2]), "cross": str(q[2]) != str(k[2])}
            n_attn += 1
        elif node.target in LINEAR:
            w = node.args[1]
            wshape = ir.shape(w)
            has_bias = len(node.args) > 2 and node.args[2] is not None
            info.role = "linear"
            info.detail = {"weight": ir.param_of.get(w.name, w.name), "in": int(wshape[1]),
                           "out": int(wshape[0]), "bias": has_bias}
            n_lin += 1
        else:
            continue
        ir.set_info(node, info)
    return PassResult(True, [f"{n_attn} attention sites, {n_lin} linears"])
