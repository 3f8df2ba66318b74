"""Symbolic bytes each rank sends per call, from the partitioned graph's per-rank shapes.

The first part of the parallel cost model: an expression per segment over the program's symbols
(batch, tokens), with the degrees already in it, recorded in the manifest next to the FLOPs.
What leaves a rank, whatever the collective's algorithm:
- `dacc.seq_to_heads` / `dacc.heads_to_seq` on P ranks keep 1/P of what they exchange and send the
  rest: (P-1)/P of the input, with its heads (in) or tokens (back) padded as the op pads them;
- `dacc.gather` (an all-gather) hands its input to each of the other P-1 ranks: (P-1)x its bytes;
- `dacc.shard` keeps a slice of a tensor every rank already holds: nothing;
- `dacc.ring_attention` passes its keys and values P-1 times to the next rank;
- `dacc.halo` all-gathers each band's two edges of `rows` rows: (P-1)x those edges;
- `dacc.group_norm` all-reduces two [batch, groups] fp32 sums; a ring all-reduce sends
  2(P-1)/P of what it reduces;
- an FSDP unit's gather (before the first segment that reads it) hands each rank's shard to the
  other P-1 ranks of the fsdp group: (P-1)x the shard bytes, whatever the inputs' sizes.
"""
from __future__ import annotations

import sympy
import torch
from torch.fx import Node
from torch.utils._sympy.functions import FloorDiv

from dacc.compiler.ir import ProgramIR
from dacc.kernels.collectives import chunk

SENT_FRACTION = {  # op -> (numerator, denominator) of the bytes sent per input byte, on P ranks
    torch.ops.dacc.seq_to_heads.default: lambda p: (p - 1, p),
    torch.ops.dacc.heads_to_seq.default: lambda p: (p - 1, p),
    torch.ops.dacc.gather.default: lambda p: (p - 1, 1),
    torch.ops.dacc.shard.default: lambda p: (0, 1),
}


def node_sent_bytes(ir: ProgramIR, node: Node) -> sympy.Expr:
    if node.op == "call_function" and node.target is torch.ops.dacc.ring_attention.default:
        # the local keys and values go around the ring: P-1 hops, each sending one block
        k, v = node.args[1], node.args[2]
        block = sum((sympy.Mul(*ir.shape(t)) * t.meta["val"].element_size() for t in (k, v)), sympy.Integer(0))
        return block * (int(node.args[5]) - 1)
    if node.op == "call_function" and node.target is torch.ops.dacc.halo.default:
        x, dim, rows, world = node.args[0], node.args[1], int(node.args[2]), int(node.args[-1])
        shape = list(ir.shape(x))
        shape[dim] = 2 * rows
        return sympy.Mul(*shape) * x.meta["val"].element_size() * (world - 1)
    if node.op == "call_function" and node.target is torch.ops.dacc.group_norm.default:
        x, groups, world = node.args[0], int(node.args[1]), int(node.args[-1])
        return FloorDiv(2 * ir.shape(x)[0] * groups * 4 * 2 * (world - 1), world)
    fraction = SENT_FRACTION.get(node.target) if node.op == "call_function" else None
    if fraction is None:
        return sympy.Integer(0)
    x = node.args[0]
    world = int(node.args[-1])
    num, den = fraction(world)
    total = sympy.Mul(*_exchanged_shape(ir, node, world)) * x.meta["val"].element_size() * num
    # an integer division, not a rational: expression trees evaluate in integers (the all-to-all's
    # input splits into P equal shares, so nothing is lost)
    return FloorDiv(total, den) if den != 1 else total


def _exchanged_shape(ir: ProgramIR, node: Node, world: int) -> list[sympy.Expr]:
    """The input's shape as the op hands it to the collective: heads padded on the way in, this
    rank's tokens as P padded chunks on the way back."""
    shape = list(ir.shape(node.args[0]))
    if node.target is torch.ops.dacc.seq_to_heads.default:
        heads = node.args[1]
        shape[heads] = FloorDiv(shape[heads] + world - 1, world) * world
    elif node.target is torch.ops.dacc.heads_to_seq.default and node.args[3]:
        tokens = node.args[2]
        shape[tokens] = sum((FloorDiv(ir.expr(p.meta["val"]) + world - 1, world) if isinstance(p, Node) else chunk(p, world)
                             for p in node.args[3]), sympy.Integer(0)) * world
    return shape


def node_messages(node: Node) -> int:
    """Collective calls a rank makes for this op (each pays the link's latency): one per exchange,
    P-1 for a ring's hops."""
    if node.op != "call_function":
        return 0
    if node.target is torch.ops.dacc.ring_attention.default:
        return int(node.args[5]) - 1
    if node.target is torch.ops.dacc.group_norm.default:  # the mean, then the variance
        return 2
    if node.target is torch.ops.dacc.halo.default:
        return 1
    return int(node.target in SENT_FRACTION and node.target is not torch.ops.dacc.shard.default)

