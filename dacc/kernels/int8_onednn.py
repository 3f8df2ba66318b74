"""The int8 GEMM of `int8_dynamic` on x86 CPUs: oneDNN's quantized linear (the kernel PyTorch's
own x86 quantization lowers to), about 2-2.5x the fp32 matmul on AVX2 where `torch._int_mm`
falls back to a loop thirty times slower than fp32.

Exactness. Without VNNI, x86 multiplies u8 activations by s8 weights with `vpmaddubsw`, which
adds two adjacent products into int16 *with saturation*: 2 * 255 * 127 overflows, and feeding it
the full 8-bit range gives ~1.5% relative error from clipped sums (measured), not from rounding.
So on CPUs without VNNI the activations are quantized to 7 bits (|q| <= 63, the same reduction
fbgemm's `reduce_range` makes) and shifted to u8 about zero point 64: 2 * 127 * 127 < 2^15 and
the integer result is exact. With VNNI (int32 accumulation) the full 8 bits are used.
`activation_qmax()` says which; the reference with that range is what this path computes.

oneDNN wants its weights prepacked into a blocked layout (an opaque tensor that cannot live in an
exported program or a safetensors file), so each int8 weight is packed on first use and kept
while the weight tensor lives.
"""
from __future__ import annotations

import functools
import platform
import weakref

import torch

from dacc.kernels.int8 import quantize_rows_int8

# id(weight) -> (weak reference to it, its version when packed, the packed weight, its zero points)
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor, torch.Tensor]] = {}


@functools.cache
def available() -> bool:
    """oneDNN's quantized linear is built into this torch and the CPU has AVX2 or better."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.cpu._is_avx2_supported())


@functools.cache
def activation_qmax() -> int:
    """127 where the CPU accumulates u8 x s8 in int32 (VNNI), 63 where AVX2 saturates int16 pairs."""
    return 127 if torch.cpu._is_vnni_supported() else 63


def _packed(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, its all-zero zero points), made once per weight rather than every call."""
    key = id(qweight)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == qweight._version:
        return hit[2], hit[3]

    def forget(ref, key=key):
        if _PACKED.get(key, (None,))[0] is ref:
            del _PACKED[key]
    packed = torch.ops.onednn.qlinear_prepack(qweight, None)
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.int64, device=qweight.device)
    _PACKED[key] = (weakref.ref(qweight, forget), qweight._version, packed, zero_points)
    return packed, zero_points


def linear_int8_dynamic_onednn(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """y = (quant_rows(x, activation_qmax()) @ qweight.T in int32) * x_scale * scale + bias."""
    lead, k = x.shape[:-1], x.shape[-1]
    qmax = activation_qmax()
    xq, xs = quantize_rows_int8(x.reshape(-1, k), qmax)
    zero_point = qmax + 1  # u8 in [1, 2 * qmax + 1]
    xu = (xq.to(torch.int16) + zero_point).to(torch.uint8)
    n = qweight.shape[0]
    packed, weight_zero_points = _packed(qweight)
    # oneDNN applies the per-channel weight scale to the int32 sums; the per-row activation scale
    # and then the bias follow (oneDNN's bias would be added before the row scale).
    out = torch.ops.onednn.qlinear_pointwise(
        xu, 1.0, zero_point, packed, scale.float(), weight_zero_points, None, 1.0, 0, torch.float32, "none", [], "")
    out = out.mul_(xs)
    if bias is not None:
        out = out.add_(bias.float())
    return out.to(x.dtype).reshape(*lead, n)
