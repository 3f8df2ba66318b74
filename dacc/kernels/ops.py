"""Every dacc operator, declared once with `torch.library` and registered on `import dacc`.

How a dacc operator is declared (quantization, parallelism and lowering all add them):
1. `torch.library.custom_op("dacc::name", mutates_args=())` with a typed signature: the schema
   exported programs record, so `torch.export.save` writes `torch.ops.dacc.name.default` and
   dacc's loader (which allows the `aten` and `dacc` namespaces only) can rebuild it.
2. Its body dispatches (`dacc/kernels/dispatch.py`): the PyTorch reference in
   `dacc/kernels/<topic>.py`, or, for CUDA tensors, Triton kernels launched through
   `torch.library.wrap_triton`. Where Triton is installed the op is declared with
   `torch.library.triton_op` rather than `custom_op`, so Inductor traces into the body and sees
   the kernels when the artifact is lowered. The kernels are tested against the references
   (under `TRITON_INTERPRET=1` on CPU). A path Inductor cannot compile (oneDNN's prepacked int8
   GEMM) is a `custom_op` of its own that the body calls, so Inductor calls it too.
3. `register_fake`: output shapes and dtypes from input shapes, symbolic sizes included, so the
   compiler can insert the op into an exported graph and Inductor can compile around it.
4. `register_flop_formula`: the matmul FLOPs `torch.utils.flop_counter.FlopCounterMode` reports,
   so benchmarks count a quantized linear like the linear it replaced. The compiler's own
   symbolic count (`dacc/compiler/flops.py`) uses the same formula.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from dacc.kernels.dispatch import triton_available, use_onednn, use_triton
from dacc.kernels.fp8 import linear_fp8_dynamic_reference, scaled_matmul_fp8
from dacc.kernels.int4 import linear_int4_weight_reference
from dacc.kernels.int8 import linear_int8_dynamic_reference, linear_int8_weight_reference
from dacc.kernels.int8_onednn import linear_int8_dynamic_onednn


def _declare(name: str):
    """`triton_op` where Triton is installed (Inductor sees the kernels), `custom_op` otherwise."""
    if triton_available():
        return torch.library.triton_op(f"dacc::{name}", mutates_args=())
    return torch.library.custom_op(f"dacc::{name}", mutates_args=())


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _linear_fake(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "in_features differ from the weight's")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@_declare("linear_int8_weight")
def linear_int8_weight(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = x @ dequant(qweight, scale).T + bias; qweight int8 [out, in], scale fp32 [out]. No Triton
    kernel yet: on GPUs the dequantized weight goes through cuBLAS."""
    return linear_int8_weight_reference(x, qweight, scale, bias)


@_declare("linear_int8_dynamic")
def linear_int8_dynamic(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = (quant_rows(x) @ qweight.T in int32) * x_scale * scale + bias. On x86 CPUs the GEMM is
    oneDNN's (`int8_onednn.py`: 7-bit activations where the CPU lacks VNNI)."""
    if use_onednn(x):
        return torch.ops.dacc.linear_int8_dynamic_onednn(x, qweight, scale, bias)
    if use_triton(x) and x.numel() > 0:
        from dacc.kernels.quant_triton import int8_linear_triton, quantize_rows_triton
        xq, xs = quantize_rows_triton(_rows(x), fp8=False)
        y = int8_linear_triton(xq, xs, qweight, scale, bias, x.dtype)
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    return linear_int8_dynamic_reference(x, qweight, scale, bias)


@torch.library.custom_op("dacc::linear_int8_dynamic_onednn", mutates_args=())
def _linear_int8_dynamic_onednn(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """linear_int8_dynamic's x86 CPU path, an op of its own and never a `triton_op`: Inductor, which
    traces into linear_int8_dynamic's body when it lowers a segment, calls this one as it is
    (oneDNN's weight prepacking is nothing Inductor or an AOTInductor package can compile)."""
    return linear_int8_dynamic_onednn(x, qweight, scale, bias)


@_declare("linear_fp8_dynamic")
def linear_fp8_dynamic(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = scaled_mm(fp8_rows(x), qweight.T, x_scale, scale) + bias; qweight float8_e4m3fn [out, in].
    On GPUs the activation quantizer is a Triton kernel and the GEMM torch's `_scaled_mm`."""
    if use_triton(x) and x.numel() > 0:
        from dacc.kernels.quant_triton import quantize_rows_triton
        xq, xs = quantize_rows_triton(_rows(x), fp8=True)
        return scaled_matmul_fp8(xq, xs, qweight, scale, bias, x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
    return linear_fp8_dynamic_reference(x, qweight, scale, bias)


@_declare("linear_int4_weight")
def linear_int4_weight(x: Tensor, packed: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """y = x @ dequant(packed, scales).T + bias; packed uint8 [out, in // 2], scales fp32 [out, in // group].
    The Triton kernel unpacks and dequantizes inside its K loop (the weight is read at 4 bits)."""
    if use_triton(x) and x.numel() > 0:
        from dacc.kernels.quant_triton import int4_linear_triton
        return int4_linear_triton(_rows(x), packed, scales, bias).reshape(*x.shape[:-1], packed.shape[0])
    return linear_int4_weight_reference(x, packed, scales, bias)


for _op in (linear_int8_weight, linear_int8_dynamic, _linear_int8_dynamic_onednn, linear_fp8_dynamic):
    _op.register_fake(_linear_fake)


@linear_int4_weight.register_fake
def _int4_fake(x: Tensor, packed: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(x.shape[-1] == 2 * packed.shape[1], lambda: "in_features differ from the packed weight's")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def _int4_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * x_shape[-1]  # the packed weight holds two per byte


register_flop_formula([torch.ops.dacc.linear_int8_weight, torch.ops.dacc.linear_int8_dynamic,
                       torch.ops.dacc.linear_int8_dynamic_onednn, torch.ops.dacc.linear_fp8_dynamic])(_linear_flops)
register_flop_formula([torch.ops.dacc.linear_int4_weight])(_int4_flops)

QUANTIZED_LINEARS = {torch.ops.dacc.linear_int8_weight.default, torch.ops.dacc.linear_int8_dynamic.default,
                     torch.ops.dacc.linear_fp8_dynamic.default, torch.ops.dacc.linear_int4_weight.default}


def missing_support(op_name: str) -> str | None:
    """What this torch lacks to run a quantized linear (an artifact using it is refused at load)."""
    needs = {"linear_int8_dynamic": ["_int_mm"], "linear_fp8_dynamic": ["_scaled_mm", "float8_e4m3fn"]}
    lacking = [n for n in needs.get(op_name, []) if not hasattr(torch, n)]
    return f"torch {torch.__version__} has no {', '.join('torch.' + n for n in lacking)}" if lacking else None
