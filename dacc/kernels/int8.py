"""Int8 quantization: the PyTorch reference of every int8 kernel, and the weight quantizer the
compiler uses. Symmetric, zero-point free: q = round(v / scale) clamped to [-127, 127], scale =
absmax / 127 per output channel (weights) or per token (activations)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = 127
_EPS = 1e-12  # an all-zero row or channel gets scale EPS/127 and quantizes to zeros


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 scale [out]) per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(_EPS) / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def quantize_rows_int8(x: torch.Tensor, qmax: int = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last-dim row) dynamic quantization: (int8 like x in [-qmax, qmax], fp32 scale
    [..., 1]). qmax < 127 where a CPU kernel needs headroom (`int8_onednn.activation_qmax`)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / qmax
    return torch.round(xf / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def linear_int8_weight_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only: the weight is dequantized for the matmul; the activations stay as they are."""
    return F.linear(x, dequantize_weight_int8(qweight, scale, x.dtype), bias)


def linear_int8_dynamic_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                  bias: torch.Tensor | None, qmax: int = QMAX) -> torch.Tensor:
    """Activations quantized per token, integer matmul (int32 accumulation), then both scales and
    the bias applied to the int32 result."""
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_rows_int8(x.reshape(-1, k), qmax)
    acc = torch._int_mm(xq, qweight.t()) if xq.shape[0] else xq.new_zeros((0, qweight.shape[0]), dtype=torch.int32)
    out = acc.float() * xs * scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, qweight.shape[0])
