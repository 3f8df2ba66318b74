"""Symbolic FLOPs of the ops that dominate a DiT: linears, matmuls, convolutions, attention.

Counted like torch.utils.flop_counter (2 FLOPs per multiply-add), but over sympy shapes, so one
expression serves every resolution and batch size a program accepts.
"""
from __future__ import annotations

import sympy
import torch
from torch.fx import Node

from dacc.compiler.ir import ProgramIR
from dacc.kernels.ops import QUANTIZED_LINEARS

aten = torch.ops.aten


def _prod(xs) -> sympy.Expr:
    out = sympy.Integer(1)
    for x in xs:
        out = out * x
    return out


def node_flops(ir: ProgramIR, node: Node) -> sympy.Expr:
    t = node.target
    if node.op != "call_function":
        return sympy.Integer(0)
    out = ir.shape(node)
    if t is aten.linear.default or t in QUANTIZED_LINEARS:  # k from x: an int4 weight packs two per byte
        k = ir.shape(node.args[0])[-1]
        return 2 * _prod(out) * k
    if t in (aten.matmul.default, aten.mm.default, aten.bmm.default):
        k = ir.shape(node.args[0])[-1]
        return 2 * _prod(out) * k
    if t in (aten.addmm.default, aten.baddbmm.default):
        k = ir.shape(node.args[1])[-1]
        return 2 * _prod(out) * k
    if t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default):
        w = ir.shape(node.args[1])
        return 2 * _prod(out) * _prod(w[1:])
    if t in (aten.scaled_dot_product_attention.default, torch.ops.dacc.ring_attention.default):
        q, k, v = (ir.shape(a) for a in node.args[:3])
        batch_heads = _prod(q[:-2])
        # ring attention holds one block of keys at a time and sees all P of them
        blocks = int(node.args[5]) if t is not aten.scaled_dot_product_attention.default else 1
        return 2 * batch_heads * q[-2] * k[-2] * blocks * (q[-1] + v[-1])
    return sympy.Integer(0)
