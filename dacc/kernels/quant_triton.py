"""Triton kernels for the quantized linears: per-row dynamic quantization (int8 and fp8 e4m3), the
int8 x int8 GEMM with int32 accumulation and the scales and bias fused into its epilogue, and the
int4 weight-only GEMM that unpacks and dequantizes the weight inside its K loop.

The numerics are those of the PyTorch references (`dacc/kernels/int8.py`, `fp8.py`, `int4.py`):
quantization matches bit for bit, the int8 accumulation is exact, and the float epilogues apply
the same fp32 operations in the same order.

Every launch goes through `torch.library.wrap_triton`, so these launchers can be the body of a
`torch.library.triton_op` that Inductor sees into (make_fx records each launch as a
`triton_kernel_wrapper_mutation`). Under Triton's interpreter (`TRITON_INTERPRET=1`, how the CPU
tests run) `wrap_triton` hands back the interpreted kernel itself: it launches eagerly on CPU
tensors, but cannot be traced there (the interpreter has no compiled kernel to record).

Where the interpreter departs from the GPU, the kernels say so and keep both exact:
- it has no `libdevice.rint`, and it casts fp32 to fp8 with ties away from zero (and no subnormal
  rounding): rounding is done here in fp32 arithmetic (half to even, e4m3's grid) on every
  backend, so the final casts only ever see exactly representable values;
- it casts fp32 to bf16 by truncation, and `tl.dot` on bf16 tiles multiplies their raw bits:
  under the interpreter only (`INTERPRETED`), bf16 rounding is done on fp32 bits and the int4 dot
  runs on fp32 tiles holding the bf16/fp16-rounded values (their products are exact in fp32, so
  the sum is the tensor cores' up to order).

On GPUs: fp8 output needs sm_89 or later (Triton has no e4m3fn type before Ada); the int8 dot
takes BLOCK_K >= 32 and each of the int4 kernel's two dots BLOCK_K // 2 >= 16; fp32 activations
of the int4 linear are multiplied in IEEE fp32 (FMA, not tf32 tensor cores); the backend may fuse
an epilogue's multiply and add into one FMA, a difference of at most an fp32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# the references' constants
INT8_MAX = 127.0
FP8_MAX = 448.0  # e4m3's largest finite value
EPS = 1e-12  # an all-zero row gets scale EPS / QMAX and quantizes to zeros


@triton.jit
def _round_half_even(v):
    """fp32 -> int32, ties to even (torch.round); |v| < 2**23."""
    t = v.to(tl.int32)  # truncates toward zero
    f = tl.abs(v - t.to(tl.float32))  # exact: t is v with its fraction dropped
    away = (f > 0.5) | ((f == 0.5) & ((t & 1) != 0))
    return t + tl.where(away, tl.where(v < 0, -1, 1), 0)


@triton.jit
def _round_e4m3(v):
    """fp32 with |v| <= 448 -> the nearest e4m3 value (ties to even), still in fp32, sign kept
    (-0.0 included, as torch's cast gives)."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # normal range: keep 3 of the 23 mantissa bits; a carry into the exponent is the right answer
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # below 2**-6 e4m3 is subnormal: a fixed step of 2**-9
    sub = _round_half_even(a * 512.0).to(tl.float32) * (1.0 / 512.0)
    r = tl.where(a < 0.015625, sub, normal)
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still in fp32. Only for the interpreter,
    whose cast truncates; finite inputs (a NaN's payload could carry into the sign)."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_xk,
                          FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * K
    # pass 1: the row's absmax (exact whatever the order); pass 2 reads the row again to quantize
    absmax = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k < K)[None, :]
        v = tl.load(x_rows + k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(v), axis=1))
    qmax = 448.0 if FP8 else 127.0
    # div_rn: IEEE division as torch's, whatever the backend's default for `/`
    scale = tl.div_rn(tl.maximum(absmax, 1e-12), qmax)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = row_ok[:, None] & (k < K)[None, :]
        v = tl.load(x_rows + k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        # clamping before rounding equals the reference's round-then-clamp: ±qmax are on the grid
        v = tl.minimum(tl.maximum(tl.div_rn(v, scale[:, None]), -qmax), qmax)
        if FP8:
            q = _round_e4m3(v)
        else:
            q = _round_half_even(v)
        tl.store(q_rows + k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_linear_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                        stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
                        HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    # the weight is stored [N, K]; the tile is read as its transpose [BLOCK_K, BLOCK_N]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(a, w, acc)  # int8 x int8 -> int32: exact, as torch._int_mm
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    # the reference's epilogue, same operations in the same order: (acc * x_scale) * w_scale + bias
    xs = tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)
    ws = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_BF16:
        out = _round_bf16(out)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _as_dot_operand(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 v rounded to dtype, as the reference rounds the dequantized weight, in the type the
    dot takes (fp32 under the interpreter: see the module docstring)."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            return _round_bf16(v)
        return v.to(dtype).to(tl.float32)
    return v.to(dtype)


@triton.jit
def _int4_linear_kernel(x_ptr, p_ptr, s_ptr, bias_ptr, out_ptr, M, N, K,
                        stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg,
                        stride_om, stride_on,
                        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A K block is BLOCK_K // 2 bytes of the packed weight. Rather than interleave the two
    # nibbles back into K order, the activations are read as their even and odd columns and
    # meet the low and high nibbles in two dots: every byte is loaded once and used whole.
    HALF: tl.constexpr = BLOCK_K // 2
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)  # byte j holds elements 2j (low nibble) and 2j + 1 (high nibble)
    m_ok, n_ok = rm < M, rn < N
    x_even = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (2 * rj)[None, :] * stride_xk
    p_ptrs = p_ptr + rn.to(tl.int64)[None, :] * stride_pn + rj[:, None] * stride_pk
    s_rows = s_ptr + rn.to(tl.int64)[None, :] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j_ok = 2 * rj < K - k0  # K is even (a multiple of the group), so 2j + 1 < K as well
        x_mask = m_ok[:, None] & j_ok[None, :]
        xe = tl.load(x_even, mask=x_mask, other=0.0)
        xo = tl.load(x_even + stride_xk, mask=x_mask, other=0.0)
        w_mask = j_ok[:, None] & n_ok[None, :]
        b = tl.load(p_ptrs, mask=w_mask, other=0).to(tl.int32)
        # both elements of a byte share a group (the group is even); the scale is indexed per
        # element, so any BLOCK_K works with any group
        s = tl.load(s_rows + ((k0 + 2 * rj) // GROUP)[:, None] * stride_sg, mask=w_mask, other=0.0).to(tl.float32)
        w_lo = _as_dot_operand(((b & 0xF) - 8).to(tl.float32) * s, dtype, INTERPRETED)
        w_hi = _as_dot_operand(((b >> 4) - 8).to(tl.float32) * s, dtype, INTERPRETED)
        if INTERPRETED:
            xe = xe.to(tl.float32)
            xo = xo.to(tl.float32)
        # "ieee": fp32 activations are multiplied in fp32, not tf32 (ignored for 16-bit inputs)
        acc = tl.dot(xe, w_lo, acc, input_precision="ieee")
        acc = tl.dot(xo, w_hi, acc, input_precision="ieee")
        x_even += BLOCK_K * stride_xk
        p_ptrs += HALF * stride_pk
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if INTERPRETED:
        if dtype == tl.bfloat16:
            acc = _round_bf16(acc)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


# decided where triton.jit decides it: TRITON_INTERPRET as it was when this module was imported
_INTERPRETED = isinstance(_int8_linear_kernel, InterpretedFunction)


def quantize_rows_triton(x: torch.Tensor, fp8: bool, *, BLOCK_M: int = 4,
                         BLOCK_K: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantization of a 2-D x (any strides): (q [M, K] int8 or float8_e4m3fn,
    contiguous; fp32 scale [M, 1]), bit for bit `quantize_rows_int8` / `quantize_rows_fp8`."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_rows_triton: expected a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        torch.library.wrap_triton(_quantize_rows_kernel)[(triton.cdiv(m, BLOCK_M),)](
            x, q, scale, m, k, x.stride(0), x.stride(1), FP8=fp8, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return q, scale


def int8_linear_triton(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                       w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, *,
                       BLOCK_M: int = 32, BLOCK_N: int = 32, BLOCK_K: int = 64) -> torch.Tensor:
    """out [M, N] = (xq @ qweight.T in int32) * x_scale * w_scale + bias, in out_dtype.
    xq int8 [M, K], x_scale fp32 [M, 1], qweight int8 [N, K], w_scale fp32 [N], bias [N] or None.
    BLOCK_K >= 32 on GPUs (the int8 dot's minimum)."""
    m, k = xq.shape
    n = qweight.shape[0]
    if xq.dtype != torch.int8 or qweight.dtype != torch.int8 or qweight.shape[1] != k:
        raise ValueError(f"int8_linear_triton: expected int8 [M, K] and [N, K], got {xq.dtype} "
                         f"{tuple(xq.shape)} and {qweight.dtype} {tuple(qweight.shape)}")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m and n:
        # the scales and bias are small: contiguous copies keep the kernel's indexing plain
        x_scale = x_scale.reshape(m).to(torch.float32).contiguous()
        w_scale = w_scale.reshape(n).to(torch.float32).contiguous()
        bias = bias.contiguous() if bias is not None else None
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        torch.library.wrap_triton(_int8_linear_kernel)[grid](
            xq, x_scale, qweight, w_scale, bias if bias is not None else w_scale, out, m, n, k,
            xq.stride(0), xq.stride(1), qweight.stride(0), qweight.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, ROUND_BF16=_INTERPRETED and out_dtype == torch.bfloat16,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def int4_linear_triton(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None, *, BLOCK_M: int = 32, BLOCK_N: int = 32,
                       BLOCK_K: int = 64) -> torch.Tensor:
    """out [M, N] = x @ dequant(packed, scales).T + bias in x's dtype; x float [M, K], packed
    uint8 [N, K // 2], scales fp16 or fp32 [N, K // G] for groups of G consecutive inputs (G even).
    BLOCK_K is even, and >= 32 on GPUs (each of its two dots needs K >= 16)."""
    m, k = x.shape
    n = packed.shape[0]
    groups = scales.shape[1] if scales.dim() == 2 else 0
    if (packed.dtype != torch.uint8 or packed.shape[1] * 2 != k or scales.shape[0] != n
            or not groups or k % groups or (k // groups) % 2 or BLOCK_K % 2):
        raise ValueError(f"int4_linear_triton: x {tuple(x.shape)}, packed {packed.dtype} {tuple(packed.shape)} "
                         f"and scales {tuple(scales.shape)} do not describe an int4 linear with an even group")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        bias = bias.contiguous() if bias is not None else None
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        torch.library.wrap_triton(_int4_linear_kernel)[grid](
            x, packed, scales, bias if bias is not None else scales, out, m, n, k,
            x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
            out.stride(0), out.stride(1), GROUP=k // groups, HAS_BIAS=bias is not None,
            INTERPRETED=_INTERPRETED, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
