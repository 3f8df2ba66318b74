"""Group-wise int4 weights, the memory mode: each group of `group` consecutive input weights of an
output channel has one fp16 scale (absmax / 7, at least fp16's smallest normal: 2 bytes per group
rather than 4 keeps the model within 0.18x of fp32), values round to [-7, 7] against that stored
scale and are stored two per byte, offset by 8: element 2i in the low nibble of byte i, element
2i+1 in the high nibble. The matmul dequantizes the weight and runs in the activation's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = 7
GROUP_SIZES = (32, 64, 128)


def int4_group(in_features: int, group: int) -> int | None:
    """The group an in_features can use (it must divide it, and be even), or None."""
    return group if in_features % group == 0 and group % 2 == 0 else None


def quantize_weight_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [out, in // 2] packed, fp16 scales [out, in // group])."""
    n, k = weight.shape
    if int4_group(k, group) is None:
        raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group}")
    w = weight.detach().float().reshape(n, k // group, group)
    scales = group_scales(w)
    return pack_int4(round_int4(w, scales).reshape(n, k)), scales


def group_scales(w: torch.Tensor) -> torch.Tensor:
    """fp16 scales of groups [..., group] (their last dimension): absmax / 7, stored as fp16."""
    return (w.abs().amax(dim=-1) / QMAX).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)


def round_int4(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """w [..., group] to integers in [-7, 7] against the fp16 `scales` [...] it will be stored with."""
    return torch.round(w / scales.float()[..., None]).clamp_(-QMAX, QMAX)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers [out, in] in [-7, 7] two per byte (offset by 8; element 2i in the low nibble)."""
    q = q.to(torch.int16) + 8
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in [-8, 7] from the packed bytes."""
    p = packed.to(torch.int16)
    low, high = (p & 0xF) - 8, (p >> 4) - 8
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)


def dequantize_weight_int4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    group = k // scales.shape[1]
    return (q.reshape(n, -1, group) * scales.float()[..., None]).reshape(n, k).to(dtype)


def linear_int4_weight_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                                 bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_weight_int4(packed, scales, x.dtype), bias)
