"""Float8 (e4m3) quantization: the PyTorch reference of the fp8 linear and its quantizers.
Scales are absmax / 448 (e4m3's largest finite value) per output channel for weights and per
token for activations; the matmul is `torch._scaled_mm`, which applies both scales and the bias
to the fp32 accumulation (it runs on CPU as well as on GPUs with fp8 tensor cores)."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_EPS = 1e-12


def quantize_weight_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [out, in], fp32 scale [out])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(_EPS) / FP8_MAX
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization: (float8_e4m3fn like x, fp32 scale [..., 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS) / FP8_MAX
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_matmul_fp8(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[M, N] from fp8 rows [M, K] and their scales [M, 1]: both scales and the bias applied to the
    fp32 accumulation."""
    return torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=scale[None, :].contiguous(),
                            bias=None if bias is None else bias.to(dtype), out_dtype=dtype)


def linear_fp8_dynamic_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 bias: torch.Tensor | None) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_zeros((*lead, n))
    xq, xs = quantize_rows_fp8(x2)
    return scaled_matmul_fp8(xq, xs, qweight, scale, bias, x.dtype).reshape(*lead, n)
