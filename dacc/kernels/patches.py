"""Patch parallelism for convolutional decoders (plan `parallel.vae_patch`), as dacc operators
the `partition_patches` pass inserts; groups are named by role as in collectives.py.

Each rank holds a band of rows of every feature map. What crosses a band's edge:
- `halo(x, dim, rows, group, world)`: a convolution that reads `rows` rows beyond the band gets
  them from the neighbouring ranks (their edge rows, by one all-gather of every rank's two edges);
  the image's own top and bottom get zeros, the padding the convolution would have added;
- `group_norm(x, groups, weight, bias, eps, group, world)`: GroupNorm's mean and variance are
  over the whole image: the per-band sums are all-reduced (two passes: the mean, then the
  squared deviations from it, as a single-process GroupNorm computes them), in fp32.
Attention over all pixels (a VAE's mid-block) gathers its keys and values with `dacc.gather`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dacc.kernels.collectives import _transfer, process_group


@torch.library.custom_op("dacc::halo", mutates_args=())
def halo(x: Tensor, dim: int, rows: int, group: str, world: int) -> Tensor:
    if x.shape[dim] < rows:
        raise RuntimeError(f"dacc.halo: a band of {x.shape[dim]} rows cannot lend {rows} rows to a neighbour "
                           "(use fewer vae_patch ranks for this size)")
    zeros = x.new_zeros((*x.shape[:dim], rows, *x.shape[dim + 1:]))
    if world == 1:
        return torch.cat([zeros, x, zeros], dim)
    g = process_group(group, world)
    rank = dist.get_rank(g)
    edges = torch.cat([x.narrow(dim, 0, rows), x.narrow(dim, x.shape[dim] - rows, rows)], dim)
    every = _transfer("halo", group, torch.ops._c10d_functional.all_gather_into_tensor,
                      edges.movedim(dim, 0).contiguous(), world, g.group_name)
    bands = [b.movedim(0, dim) for b in every.chunk(world, 0)]  # rank r's (top rows, bottom rows)
    above = bands[rank - 1].narrow(dim, rows, rows) if rank > 0 else zeros
    below = bands[rank + 1].narrow(dim, 0, rows) if rank < world - 1 else zeros
    return torch.cat([above, x, below], dim)


@halo.register_fake
def _(x, dim, rows, group, world):
    shape = list(x.shape)
    shape[dim] = shape[dim] + 2 * rows
    return x.new_empty(shape)


def _all_sum(t: Tensor, group: str, world: int) -> Tensor:
    if world == 1:
        return t
    g = process_group(group, world)
    return _transfer("group_norm", group, torch.ops._c10d_functional.all_reduce, t.contiguous(), "sum", g.group_name)


@torch.library.custom_op("dacc::group_norm", mutates_args=())
def group_norm(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, group: str,
               world: int) -> Tensor:
    b, c = x.shape[:2]
    flat = x.float().reshape(b, groups, -1)
    count = flat.shape[-1] * world  # every band has as many elements
    mean = _all_sum(flat.sum(-1), group, world) / count
    dev = flat - mean[..., None]
    var = _all_sum((dev * dev).sum(-1), group, world) / count
    y = (dev * torch.rsqrt(var + eps)[..., None]).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(shape)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    return y.to(x.dtype)


@group_norm.register_fake
def _(x, groups, weight, bias, eps, group, world):
    return torch.empty_like(x)
