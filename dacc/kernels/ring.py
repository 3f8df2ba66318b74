"""Ring attention as a dacc operator (plan `parallel.ring: P`).

Each of P ranks holds 1/P of the tokens' queries, keys and values. The keys and values travel
around the ring by point-to-point sends (rank r sends to r+1 and receives from r-1), P steps in
all; at each step a rank attends its queries to the block it holds, and the partial outputs are
merged by their log-sum-exp:
    lse = logaddexp(lse_a, lse_b);  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)
so the result is softmax attention over every token, exactly (in fp32), in any block order. The
next block's transfer runs while the current one is attended. No head count needs to divide P.

Token counts need not divide P either: each block holds padded chunks of the token parts
(dacc/kernels/collectives.py), and the pad rows of every block are left out of its keys, so the
result is attention over the real tokens only. Under USP a block holds `chunks` sequence chunks
(one per ulysses rank, as the all-to-all laid them out): chunk u of ring rank j is sequence
chunk u * P + j.

The merge has a PyTorch reference here and a fused Triton kernel (ring_triton.py), chosen per
call by dacc/kernels/dispatch.py (Triton for CUDA tensors).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from dacc.kernels.collectives import chunk, process_group, transfer_failed, valid_rows
from dacc.kernels.dispatch import use_triton


def attend_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of q over one block of keys, in fp32, and the log-sum-exp of its scores."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float()), lse


def merge_by_lse(out: Tensor, lse: Tensor, part: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial attention outputs over disjoint key blocks -> the output over their union."""
    if use_triton(out):
        from dacc.kernels.ring_triton import merge_by_lse_triton
        return merge_by_lse_triton(out, lse, part, part_lse)
    return merge_by_lse_reference(out, lse, part, part_lse)


def merge_by_lse_reference(out: Tensor, lse: Tensor, part: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    total = torch.logaddexp(lse, part_lse)
    merged = out * torch.exp(lse - total).unsqueeze(-1) + part * torch.exp(part_lse - total).unsqueeze(-1)
    return merged, total


def _start_exchange(block: Tensor, group: "dist.ProcessGroup", role: str) -> tuple[Tensor, list]:
    """Start sending `block` to the next rank of the ring and receiving the previous rank's."""
    rank, size = dist.get_rank(group), group.size()
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prev = dist.get_global_rank(group, (rank - 1) % size)
    incoming = torch.empty_like(block)
    try:
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, block, nxt, group),
                                        dist.P2POp(dist.irecv, incoming, prev, group)])
    except RuntimeError as exc:
        raise transfer_failed("ring_attention", role, exc) from None
    return incoming, works


def _finish(works: list, role: str) -> None:
    try:
        for work in works:
            work.wait()
    except RuntimeError as exc:
        raise transfer_failed("ring_attention", role, exc) from None


def real_keys(block: Tensor, parts: list[int], chunks: int, world: int, source: int) -> Tensor | None:
    """The rows of ring rank `source`'s block [..., rows, dim] that are real tokens (None: none are).
    The block is `chunks` sequence chunks, each the padded chunk of every part in turn."""
    if not parts:
        return block
    shards = chunks * world
    kept, start, padded = [], 0, False
    for u in range(chunks):
        for p in parts:
            rows, real = chunk(p, shards), valid_rows(p, shards, u * world + source)
            if real:
                kept.append(block.narrow(-2, start, real))
            start, padded = start + rows, padded or real < rows
    if not padded:
        return block
    return torch.cat(kept, -2) if kept else None


@torch.library.custom_op("dacc::ring_attention", mutates_args=())
def ring_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, group: str, world: int, parts: list[int],
                   chunks: int) -> Tensor:
    """q, k, v: [..., tokens on this rank, head dim]; `scale` as in scaled_dot_product_attention;
    `parts`: the full token counts the tokens were sharded from ([]: no padding to skip)."""
    if world == 1:
        block = torch.stack([k, v])
        real = real_keys(block, parts, chunks, 1, 0)
        return attend_with_lse(q, real[0], real[1], scale)[0].to(q.dtype)
    g = process_group(group, world)
    rank = dist.get_rank(g)
    block = torch.stack([k, v]).contiguous()
    out = lse = None
    for step in range(world):
        pending = _start_exchange(block, g, group) if step < world - 1 else None
        real = real_keys(block, parts, chunks, world, (rank - step) % world)
        if real is not None:  # while the next block travels
            part, part_lse = attend_with_lse(q, real[0], real[1], scale)
            out, lse = (part, part_lse) if out is None else merge_by_lse(out, lse, part, part_lse)
        if pending is not None:
            _finish(pending[1], group)
            block = pending[0]
    return out.to(q.dtype)


@ring_attention.register_fake
def _(q, k, v, scale, group, world, parts, chunks):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@register_flop_formula(torch.ops.dacc.ring_attention)
def _ring_flops(q_shape, k_shape, v_shape, scale, group, world, *args, **kwargs) -> int:
    """Like attention over all P blocks of keys (what FlopCounterMode counts for sdpa)."""
    batch_heads = math.prod(q_shape[:-2])
    return 2 * batch_heads * q_shape[-2] * k_shape[-2] * world * (q_shape[-1] + v_shape[-1])


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
